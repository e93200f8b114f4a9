"""Training: stage 1 fits the MGVQ tokenizer, stage 2 fits HTC-VLM under M_hy on answers (Eq. 9).

Variants with one budget: `hybrid` (the method), `continuous` (VoCo-LLaMA), `discrete` (MGVQ tokens
only), and `upper` (no compression: text attends every visual token). The lower bound is the upper
model's weights evaluated through the voco bottleneck (see evaluate.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from htcvlm.checkpoint import save_pretrained
from htcvlm.config import HTCConfig
from htcvlm.data.dataset import draw_question
from htcvlm.data.llava import LlavaVQA, read_llava
from htcvlm.data.questions import answer_vocabulary
from htcvlm.data.scenes import GRID
from htcvlm.evaluate import accuracy
from htcvlm.mgvq import MGVQ
from htcvlm.model import HTCVLM, new_model
from htcvlm.pool import CELL_CLASSES, VQATensors, map_batches, procedural_pool, tensorize
from htcvlm.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

Variant = Literal["hybrid", "continuous", "discrete", "upper"]
VARIANTS: tuple[Variant, ...] = ("upper", "hybrid", "continuous", "discrete")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * this
    warmup: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    easy_steps: int = 400  # curriculum: the first steps draw only the pool's single-object samples
    mgvq_steps: int = 600
    mgvq_lr: float = 2e-3
    vision_steps: int = 0  # stage 0: the vision tower on per-cell scene labels (a stand-in for CLIP)
    vision_lr: float = 2e-3
    freeze_vision: bool = False  # stage 2 keeps the tower stage 0 trained, as LLaVA keeps CLIP frozen
    eval_every: int = 500
    seed: int = 0
    bf16: bool = False  # autocast on GPU hosts
    grad_checkpointing: bool = False  # trade compute for memory on GPU hosts

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")


def variant_config(base: HTCConfig, variant: Variant) -> HTCConfig:
    """The model config each variant trains: channels follow the variant; `upper` keeps hybrid inputs."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    channels = "hybrid" if variant == "upper" else variant
    return base.with_(channels=channels)


def lr_at(step: int, cfg: TrainConfig, base_lr: float, total: int) -> float:
    """Linear warm-up, then cosine decay to base_lr * min_lr_ratio."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Eq. 9: cross-entropy on the answer tokens (and EOS) only, the positions `scored` (B, T) marks;
    logits row t predicts token t + 1."""
    targets = ids[:, 1:]
    weights = scored[:, 1:].flatten().to(logits.dtype)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (losses * weights).sum() / weights.sum()


def train_mgvq(
    model: HTCVLM, pixels_u8: torch.Tensor, cfg: TrainConfig, show_progress: bool = True
) -> dict[str, float]:
    """Stage 1: the tokenizer on reconstruction + commitment loss. Returns the final loss parts."""
    mgvq: MGVQ = model.mgvq
    mgvq.train()
    opt = torch.optim.AdamW(mgvq.parameters(), lr=cfg.mgvq_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, float] = {}
    bar = tqdm(range(cfg.mgvq_steps), desc="stage 1 mgvq", disable=not show_progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.mgvq_lr, cfg.mgvq_steps)
        idx = torch.randint(len(pixels_u8), (cfg.batch_size,), generator=gen)
        loss, parts = mgvq.loss(pixels_u8[idx].float().to(model.device) / 255.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{parts['reconstruction']:.4f}", vq=f"{parts['commitment']:.4f}")
    mgvq.eval()
    return parts


def _state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (safetensors) and JSON: never pickled."""
    state = opt.state_dict()
    tensors = {
        f"{pid}.{name}": value.detach().cpu()
        for pid, slot in state["state"].items()
        for name, value in slot.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"]}


def _load_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(out: Path, model: HTCVLM, opt: torch.optim.Optimizer, step: int, log: list) -> None:
    save_pretrained(model, out)
    tensors, meta = _state_tensors(opt)
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "train_state.json").write_text(json.dumps({"step": step, "log": log, **meta}, indent=1))


def frozen_modules(model: HTCVLM, cfg: TrainConfig) -> list[torch.nn.Module]:
    """What stage 2 keeps fixed: the MGVQ tokenizer (fitted by stage 1), and the vision tower if asked."""
    frozen = [model.mgvq] if model.has_mgvq else []
    return frozen + ([model.vision] if cfg.freeze_vision and model.has_vision else [])


def stage2_parameters(model: HTCVLM, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Every parameter but those of the frozen modules."""
    frozen = {id(p) for m in frozen_modules(model, cfg) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


def train_vlm(
    model: HTCVLM,
    data: VQATensors,
    cfg: TrainConfig,
    variant: Variant,
    out: Path | None = None,
    val: VQATensors | None = None,
    show_progress: bool = True,
) -> list[dict[str, float]]:
    """Stage 2: the autoregressive answer loss under M_hy (or under plain causal attention for `upper`).

    Resumes from `out` when it holds a training state. Returns the log of (step, loss, val accuracy).
    """
    params = stage2_parameters(model, cfg)
    frozen = frozen_modules(model, cfg)
    for module in frozen:
        module.requires_grad_(False)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    start, log = 0, []
    if out is not None and (out / "train_state.json").is_file():
        state = json.loads((out / "train_state.json").read_text())
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        _load_state(opt, load_file(str(out / "optimizer.safetensors")), state)
        start, log = state["step"], state["log"]
        logger.info("resuming %s from step %d", out, start)
    model.train()
    for module in frozen:
        module.eval()  # no statistics to update, but keep them deterministic
    if model.has_mgvq and data.quantized is None:
        data.quantize(model)
    if cfg.freeze_vision and model.has_vision and data.patches is None:
        data.encode_patches(model)
    if cfg.grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    upper = variant == "upper"
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + start)
    bar = tqdm(
        range(start, cfg.steps),
        desc=f"stage 2 {variant}",
        initial=start,
        total=cfg.steps,
        disable=not show_progress,
    )
    started = time.perf_counter()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.lr, cfg.steps)
        if step < cfg.easy_steps and data.n_easy:
            idx = len(data) - data.n_easy + torch.randint(data.n_easy, (cfg.batch_size,), generator=gen)
        else:
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        b = {k: v.to(model.device) if v is not None else None for k, v in data.batch(idx).items()}
        scored = b.pop("scored")
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, _ = model(**b, text_attends_visual=upper)
            loss = answer_loss(logits, b["input_ids"], scored)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step + 1 == cfg.steps
        if val is not None and ((step + 1) % cfg.eval_every == 0 or last):
            model.eval()
            acc = accuracy(model, val, upper=upper)["all"]
            model.train()
            for module in frozen:
                module.eval()
            entry = {
                "step": step + 1,
                "loss": loss.item(),
                "val_accuracy": acc,
                "minutes": (time.perf_counter() - started) / 60,
            }
            log.append(entry)
            logger.info("%s step %d loss %.3f val %.3f", variant, step + 1, loss.item(), acc)
            bar.write(json.dumps(entry))
            if out is not None:
                save_training_state(out, model, opt, step + 1, log)
    model.eval()
    if out is not None:
        save_training_state(out, model, opt, cfg.steps, log)
    return log


def procedural_tokenizer(vocab_size: int = 512, n_questions: int = 4000) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges cover the procedural questions and answers (any text still encodes)."""
    texts = []
    for i in range(n_questions):
        _, question = draw_question("train", i)
        texts += [f"Question: {question.text}\nAnswer:", f" {question.answer}"]
    texts += [f" {a}" for a in answer_vocabulary()]
    return train_tokenizer(texts, vocab_size)


class CellHeads(torch.nn.Module):
    """Stage 0's heads, discarded after it: each cell's attributes from the patch tokens pooled over the
    cell (local), and every cell's attributes from the mean of all patch tokens (global: the kind of
    summary the voco token has to make)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.classes = list(CELL_CLASSES.values())
        self.local = torch.nn.Linear(width, sum(self.classes))
        self.glob = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width),
            torch.nn.GELU(),
            torch.nn.Linear(4 * width, GRID * GRID * sum(self.classes)),
        )

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """patches (B, N, w) on a square grid -> {"local", "global"}: (B, 9, sum(classes)) logits."""
        b, n, w = patches.shape
        side = math.isqrt(n)
        grid = patches.transpose(1, 2).reshape(b, w, side, side)  # (B, N, w) -> (B, w, side, side)
        pooled = F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)  # (B, 9, w)
        glob = self.glob(patches.mean(dim=1)).view(b, GRID * GRID, -1)  # (B, 9 * sum) -> (B, 9, sum)
        return {"local": self.local(pooled), "global": glob}

    def loss(self, patches: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """patches (B, N, w); labels (B, 9, 4)."""
        total = patches.new_zeros(())
        for logits in self(patches).values():
            for col, part in enumerate(logits.split(self.classes, dim=-1)):
                total = total + F.cross_entropy(
                    part.flatten(0, 1), labels[..., col].flatten(), ignore_index=-1
                )
        return total


def train_vision(
    model: HTCVLM,
    data: VQATensors,
    cfg: TrainConfig,
    show_progress: bool = True,
    val: VQATensors | None = None,
) -> float:
    """Stage 0: the vision tower on per-cell scene labels. The paper starts from a pretrained CLIP; the
    tiny model's tower starts from scratch, and the answer loss alone teaches it shapes far too slowly.
    Returns the final loss; logs the heads' accuracy on `val`."""
    if data.cells is None:
        raise ValueError("stage 0 needs per-cell labels: procedural data only")
    heads = CellHeads(model.config.vision.hidden_size).to(model.device)
    params = list(model.vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.vision.train()
    loss = torch.zeros(())
    bar = tqdm(range(cfg.vision_steps), desc="stage 0 vision", disable=not show_progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.vision_lr, cfg.vision_steps)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        pixels = data.pixels[idx].float().to(model.device) / 255.0
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = heads.loss(model.vision_patches(pixels), data.cells[idx].to(model.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.vision.eval()
    if val is not None and val.cells is not None:
        logger.info("stage 0 validation accuracy: %s", json.dumps(cell_accuracy(model, heads, val)))
    return loss.item()


@torch.no_grad()
def cell_accuracy(model: HTCVLM, heads: CellHeads, data: VQATensors) -> dict[str, dict[str, float]]:
    """Per head and attribute, the share of occupied grid cells labelled right: how well the tower sees
    what the questions ask about."""
    assert data.cells is not None
    labels = data.cells.to(model.device)
    occupied = labels[..., 0] > 0
    patches = map_batches(lambda x: model.vision_patches(x.to(model.device)), data.pixels, 256)
    result: dict[str, dict[str, float]] = {}
    for head, logits in heads(patches.to(model.device)).items():
        result[head] = {}
        for col, (name, part) in enumerate(
            zip(CELL_CLASSES, logits.split(heads.classes, dim=-1), strict=True)
        ):
            right = (part.argmax(-1) == labels[..., col]) & occupied
            result[head][name] = round(float(right.sum() / occupied.sum()), 4)
    return result


def llava_pools(
    model: HTCVLM, json_path: Path, image_root: Path, val_size: int
) -> tuple[VQATensors, VQATensors]:
    """LLaVA-format data: every (question, answer) turn a sample; the last `val_size` held out."""
    data = LlavaVQA(read_llava(json_path, image_root, on_missing="skip"))
    if len(data) <= val_size:
        raise ValueError(f"{json_path} has {len(data)} turns with images, need more than val_size={val_size}")
    samples = [data[i] for i in range(len(data))]
    return tensorize(model, samples[:-val_size]), tensorize(model, samples[-val_size:])


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
    cfg: TrainConfig = TrainConfig(),
    pool: int = 100000,
    easy: int = 10000,
    questions: int = 4,
    val_size: int = 500,
    mgvq_from: Path | None = None,
    device: str = "cpu",
    llava: tuple[Path, Path] | None = None,
    init_from: Path | None = None,
    **config_overrides: object,
) -> HTCVLM:
    """The whole recipe: tokenizer, model, stage 1 (or MGVQ weights copied from `mgvq_from`), stage 2.

    `init_from`: start stage 2 from another checkpoint's weights (every tensor whose name and shape
    match, the MGVQ included, so stage 1 is skipped): a compressed variant from the upper-bound model,
    or every variant from one run with `steps=0`, which stops after stages 1 and 0.
    Resumable: a rerun with the same `out` continues stage 2 from its last saved state.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = procedural_tokenizer()
    config = variant_config(HTCConfig.from_name(preset), variant).with_(**config_overrides)
    model = new_model(config, tokenizer).to(device)
    logger.info("rendering %d + %d easy training and %d validation samples", pool, easy, val_size)
    if llava is not None:
        train_data, val_data = llava_pools(model, *llava, val_size)
    else:
        train_data = procedural_pool(model, "train", pool, easy, questions)
        val_data = procedural_pool(model, "val", val_size)
    resuming = (out / "train_state.json").is_file()
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
            parts = train_mgvq(model, train_data.pixels, cfg)
            logger.info("stage 1 done: %s", parts)
    tower_trained = config.vision.path is not None or init_from is not None
    if cfg.vision_steps and model.has_vision and not resuming:
        if train_data.cells is None:
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
    (out / "training.json").write_text(
        json.dumps(
            {
                "variant": variant,
                "preset": preset,
                "pool": pool,
                "easy": easy,
                "questions": questions,
                "init_from": str(init_from) if init_from else None,
                "overrides": {k: str(v) for k, v in config_overrides.items()},
                "train": asdict(cfg),
            },
            indent=2,
        )
    )
    if cfg.steps == 0:  # stages 1 and 0 only: a start for several variants' stage 2 (`init_from`)
        model.eval()
        save_pretrained(model, out)
        return model
    train_vlm(model, train_data, cfg, variant, out=out, val=val_data)
    return model
