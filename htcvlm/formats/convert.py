"""`onetoken convert`: published checkpoints -> a OneToken model that `save_pretrained` writes as an ordinary
checkpoint folder (which serve, ingest, train and eval then use unchanged).

- `convert_llava`: LLaVA-1.5 (either format) -> an HTC-VLM whose CLIP tower, P_v and LLM are LLaVA's, in
  the LLaVA-built layout (Vicuna v1's template, as LLaVA-1.5 was trained and evaluated:
  `tokenizer_image_token` of "{system} USER: <image>\\n{question} ASSISTANT:"). With an MGVQ checkpoint it
  is the hybrid model, MGVQ's encoder and quantizer published, P_d new; without, continuous-only.
  Either way the voco bottleneck is untrained: LLaVA never read an image through one token.
- `convert_voco_llama`: a VoCo-LLaMA checkpoint -> its continuous-only model with its two trained voco
  tokens, ready to serve (formats/voco_llama.py).

The model is built on the meta device and given the read tensors themselves (`assign`), so a 7B
conversion holds its weights once; only the new parts are allocated and initialised (seeded). Its
non-persistent buffers (rotary frequencies, CLIP statistics) stay on the meta device: the result is for
`save_pretrained`, and `load_pretrained` of the folder runs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from htcvlm.config import HTCConfig, LayoutConfig
from htcvlm.errors import CheckpointError
from htcvlm.formats.llava import detect_format, read_llava
from htcvlm.formats.mgvq import read_mgvq
from htcvlm.formats.voco_llama import read_voco_llama
from htcvlm.model import HTCVLM

logger = logging.getLogger(__name__)

DtypeName = Literal["bf16", "fp16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# conv_vicuna_v1 in haotian-liu/LLaVA: LLaVA-1.5's template for training and evaluation
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA-1.5's sequence, "<image>" replaced by V_hy · voco: the text on each side tokenized on its own, the
# question after a newline, the answer ending at </s> (sep2 of the TWO separator style), a later turn of
# the conversation right after that </s> (what training on multi-turn LLaVA data packs).
LLAVA_LAYOUT = LayoutConfig(
    bos=True,
    system=VICUNA_SYSTEM,
    before_image="{system} USER: ",
    prompt="\n{question} ASSISTANT:",
    next_prompt="USER: {question} ASSISTANT:",
    stop_tokens=("</s>",),
)
PD_HIDDEN = HTCConfig().pd_hidden  # the paper's width of W1 in P_d


@dataclass(frozen=True)
class Converted:
    """A converted model and what it is made of: part -> where its weights come from (`pretrained`) or
    how they start (`untrained`), for the command's summary."""

    model: HTCVLM
    source: str
    pretrained: dict[str, str]
    untrained: dict[str, str]
    ready: bool  # whether it answers without training (its voco bottleneck was trained)


def convert_llava(
    src: str | Path,
    clip: str | Path | None = None,
    mgvq: str | Path | None = None,
    dtype: DtypeName | None = None,
    pd_hidden: int = PD_HIDDEN,
    seed: int = 0,
) -> Converted:
    """LLaVA-1.5 (`clip`: the CLIP folder the original format needs) -> HTC-VLM, hybrid when an MGVQ
    checkpoint is given. `dtype`: of every weight written (default: the LLM's published dtype)."""
    src = _existing(src, "LLaVA folder")
    kind = detect_format(src)
    imported = read_llava(src, _existing(clip, "CLIP folder") if clip is not None else None)
    config = replace(imported.config, layout=LLAVA_LAYOUT)
    tower = f"CLIP from {clip}" if clip is not None else f"CLIP from {src}"
    pretrained = {
        "vision tower": f"{tower} (layer {config.vision.select_layer}, patch tokens)",
        "P_v": f"LLaVA-1.5's projector ({config.projector})",
        "LLM": f"LLaVA-1.5's Vicuna ({config.llm.num_layers} layers, {config.llm.vocab_size} tokens)",
    }
    untrained = {"voco": "the mean input embedding (LLaVA has no voco token)"}
    state, fresh = imported.state, []  # taken over: cast and assigned in place, never copied
    if mgvq is not None:
        mgvq_config, mgvq_state = read_mgvq(_existing(mgvq, "MGVQ checkpoint", file=True))
        try:
            config = replace(
                config, name="llava-1.5-htc", channels="hybrid", mgvq=mgvq_config, pd_hidden=pd_hidden
            )
        except ValueError as exc:
            raise CheckpointError(f"LLaVA's tower and MGVQ {mgvq} do not fit one model: {exc}") from exc
        state |= {f"mgvq.{k}": v for k, v in mgvq_state.items()}
        fresh.append("proj_d")
        pretrained["MGVQ"] = f"encoder and quantizer from {mgvq} ({mgvq_config.codebook_size} codes)"
        untrained["P_d"] = f"random (seed {seed}), {config.q_dim} -> {pd_hidden} -> {config.n_discrete} x d"
    model = _build(config, imported.tokenizer, state, fresh, dtype, seed)
    return Converted(model, f"LLaVA-1.5 ({kind} format) {src}", pretrained, untrained, ready=False)


def convert_voco_llama(src: str | Path, clip: str | Path, dtype: DtypeName | None = None) -> Converted:
    """A VoCo-LLaMA checkpoint and its CLIP folder -> a continuous-only model with two trained voco
    tokens, ready to serve."""
    src = _existing(src, "VoCo-LLaMA folder")
    imported = read_voco_llama(src, _existing(clip, "CLIP folder"))
    config = imported.config
    pretrained = {
        "vision tower": f"CLIP from {clip} (layer {config.vision.select_layer}, patch tokens)",
        "P_v": f"VoCo-LLaMA's projector ({config.projector})",
        "LLM": f"VoCo-LLaMA's ({config.llm.num_layers} layers, {config.llm.vocab_size} tokens)",
        "voco": f"VoCo-LLaMA's <voco> embedding ({config.n_voco} tokens)",
    }
    model = _build(config, imported.tokenizer, imported.state, [], dtype, seed=0)
    return Converted(model, f"VoCo-LLaMA {src}", pretrained, {}, ready=True)


def summary(converted: Converted, out: Path) -> str:
    """What the command prints: the parts and where they come from, the layout, and what to do next."""
    model, cfg = converted.model, converted.model.config
    params = sum(p.numel() for p in model.parameters())
    dtype = str(model.voco.dtype).removeprefix("torch.")
    lines = [
        f"converted {converted.source}",
        f"into {out}: {cfg.channels} HTC-VLM, {params / 1e6:,.1f} M parameters, {dtype}, "
        f"{cfg.n_visual} image tokens -> {cfg.n_voco} voco",
        "pretrained:",
        *(f"  {part:<13} {where}" for part, where in converted.pretrained.items()),
        "untrained (new):",
        *(f"  {part:<13} {how}" for part, how in converted.untrained.items()),
    ]
    if not converted.untrained:
        lines[-1] = "untrained: nothing"
    layout = model.layout
    lines.append(
        f"layout: {layout.n_shared} shared prefix tokens, image, {layout.n_separator} separator tokens, "
        f"voco, prompt {cfg.layout.prompt!r}; text reads the prefix: {layout.text_attends_prefix}"
    )
    if converted.ready:
        lines.append(f"ready to serve: onetoken serve --model {out}")
    else:
        lines.append(
            "note: the voco bottleneck itself is untrained (LLaVA never read an image through one token): "
            "answers are meaningless until the model is trained as HTC-VLM (stage 2, Eq. 9); "
            f"it serves as it is: onetoken serve --model {out}"
        )
    return "\n".join(lines)


def _build(
    config: HTCConfig,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor],
    fresh: list[str],
    dtype: DtypeName | None,
    seed: int,
) -> HTCVLM:
    """HTCVLM(config) holding `state`'s tensors, the `fresh` submodules newly initialised (seeded)."""
    target = DTYPES[dtype] if dtype is not None else state["llm.model.embed_tokens.weight"].dtype
    for key, tensor in state.items():
        if tensor.is_floating_point():
            state[key] = tensor.to(target)  # in place, one tensor at a time: never two copies of a 7B state
    with torch.device("meta"):
        model = HTCVLM(config, tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    expected_missing = {k for k in model.state_dict() if k.split(".")[0] in fresh}
    if unexpected or set(missing) != expected_missing:
        raise CheckpointError(
            f"converted weights do not fit {config.name}: missing {sorted(set(missing) - expected_missing)}"
            f", unexpected {sorted(unexpected)}"
        )
    for name in fresh:
        module = model.get_submodule(name).to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for part in module.modules():
                if hasattr(part, "reset_parameters"):
                    part.reset_parameters()
        module.to(target)
    return model.eval()


def _existing(path: str | Path, what: str, file: bool = False) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not (path.is_file() if file else path.is_dir()):
        raise CheckpointError(f"{what} {path} is not a {'file' if file else 'folder'}")
    return path
