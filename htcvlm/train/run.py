"""The whole recipe in one call: tokenizer, model, pools, stages 1, 0 and 2, into a checkpoint folder."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from htcvlm.checkpoint import save_pretrained
from htcvlm.config import HTCConfig
from htcvlm.model import HTCVLM, new_model
from htcvlm.train.data import procedural_tokenizer, training_pools
from htcvlm.train.recipe import RECIPES, TrainConfig, Variant, variant_config
from htcvlm.train.stages import train_mgvq, train_vision, train_vlm

logger = logging.getLogger(__name__)

RUN_RECORD = "training.json"  # the run's config, beside the checkpoint it trained


def init_weights(model: HTCVLM, path: Path) -> int:
    """Copy every tensor of the checkpoint at `path` whose name and shape match `model`'s; returns how many.

    The tokenizer must be the same (the procedural one is deterministic), or the embeddings mean nothing.
    """
    own = model.state_dict()
    state = {
        k: v
        for k, v in load_file(str(path / "model.safetensors")).items()
        if k in own and own[k].shape == v.shape
    }
    model.load_state_dict(state, strict=False)
    return len(state)


def run_training(
    out: Path,
    variant: Variant = "hybrid",
    preset: str = "tiny",
    cfg: TrainConfig = RECIPES["tiny"],
    mgvq_from: Path | None = None,
    device: str = "cpu",
    llava: tuple[Path, Path] | None = None,
    init_from: Path | None = None,
    **config_overrides: object,
) -> HTCVLM:
    """The whole recipe: tokenizer, model, pools, stage 1 (or MGVQ weights copied from `mgvq_from`),
    stage 0, stage 2; `onetoken train` is this call. `preset` and `config_overrides` make the model's
    `HTCConfig`; `llava` = (JSON file, image root) trains on LLaVA-format data instead of procedural.

    `init_from`: start stage 2 from another checkpoint's weights (every tensor whose name and shape
    match, the MGVQ included, so stage 1 is skipped): a compressed variant from the upper-bound model,
    or every variant from one run with `steps=0`, which stops after stages 1 and 0.
    Resumable: a rerun with the same `out` continues stage 2 from its last saved state.
    """
    if cfg.lora_rank and cfg.steps:
        raise ValueError("LoRA (lora_rank > 0) trains on the Ray Train path only: pass --workers N")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = procedural_tokenizer()
    config = model_config(preset, variant, config_overrides)
    model = new_model(config, tokenizer).to(device)
    resuming = (out / "train_state.json").is_file()
    trains_mgvq = model.has_mgvq and not resuming and init_from is None and mgvq_from is None
    trains_vision = bool(cfg.vision_steps) and model.has_vision and not resuming and llava is None
    train_data = val_data = None
    if cfg.steps or trains_mgvq or trains_vision:  # `--steps 0 --init-from` (distributed) renders nothing
        logger.info(
            "rendering %d + %d easy training and %d validation samples", cfg.pool, cfg.easy, cfg.val_size
        )
        train_data, val_data = training_pools(model, cfg, llava)
    if init_from is not None and not resuming:
        copied = init_weights(model, init_from)
        logger.info("%d of %d tensors from %s", copied, len(model.state_dict()), init_from)
    if model.has_mgvq and not resuming and (init_from is None or mgvq_from is not None):
        if mgvq_from is not None:
            state = load_file(str(mgvq_from / "model.safetensors"))
            model.mgvq.load_state_dict(
                {k[len("mgvq.") :]: v for k, v in state.items() if k.startswith("mgvq.")}
            )
            logger.info("MGVQ weights from %s", mgvq_from)
        else:
            assert train_data is not None
            parts = train_mgvq(model, train_data.pixels, cfg)
            logger.info("stage 1 done: %s", parts)
    tower_trained = config.vision.path is not None or init_from is not None
    if cfg.vision_steps and model.has_vision and not resuming:
        if train_data is None or train_data.cells is None:
            logger.warning("no per-cell labels in this data: stage 0 (vision on scene labels) skipped")
        else:
            logger.info("stage 0 done: loss %.3f", train_vision(model, train_data, cfg, val=val_data))
            tower_trained = True
    if resuming and (out / "training.json").is_file():  # keep the first run's choice
        recorded = json.loads((out / "training.json").read_text())["train"].get("freeze_vision", False)
        cfg = replace(cfg, freeze_vision=recorded)
    elif cfg.freeze_vision and model.has_vision and not tower_trained:
        logger.warning("the vision tower is untrained (no stage 0, no pretrained weights): stage 2 trains it")
        cfg = replace(cfg, freeze_vision=False)
    write_run_record(out, variant, preset, init_from, config_overrides, cfg)
    if cfg.steps == 0:  # stages 1 and 0 only: a start for several variants' stage 2 (`init_from`)
        model.eval()
        save_pretrained(model, out)
        return model
    assert train_data is not None
    train_vlm(model, train_data, cfg, variant, out=out, val=val_data)
    return model


def run_record(
    variant: str,
    preset: str,
    init_from: str | Path | None,
    config_overrides: dict[str, Any],
    cfg: TrainConfig,
    **more: Any,
) -> dict[str, Any]:
    """What the run was asked for (and `more` of what happened), as `training.json` holds it."""
    return {
        "variant": variant,
        "preset": preset,
        "init_from": str(init_from) if init_from else None,
        "overrides": {k: str(v) for k, v in config_overrides.items()},
        "train": asdict(cfg),
        **more,
    }


def model_config(preset: str, variant: Variant, overrides: dict[str, Any]) -> HTCConfig:
    """The preset's config for `variant` with top-level fields changed, and `image_marker`, the one
    layout field a run sets, put into its layout."""
    fields = {k: v for k, v in overrides.items() if k != "image_marker"}
    config = variant_config(HTCConfig.from_name(preset), variant).with_(**fields)
    if overrides.get("image_marker"):
        config = config.with_(layout=replace(config.layout, image_marker=str(overrides["image_marker"])))
    return config


def write_run_record(
    out: Path,
    variant: str,
    preset: str,
    init_from: str | Path | None,
    config_overrides: dict[str, Any],
    cfg: TrainConfig,
    **more: Any,
) -> None:
    """`out/training.json` (`run_record`), for the run's reruns."""
    record = run_record(variant, preset, init_from, config_overrides, cfg, **more)
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2))
