"""MGVQ's released tokenizer checkpoints (`mgvq_f16c32_g8.pt` and its siblings) -> OneToken's `MGVQ`.

A published `.pt` is a torch pickle of a dict holding the state dict under "model" (what MGVQ's evaluation
reads) or "state_dict" (what its model class reads); a bare state dict is taken as well. It is read with
`torch.load(weights_only=True)` only. Its keys are mapped onto OneToken's module names (mgvq_dcae.py), the
geometry (stage widths and depths, attention stages, latent channels, groups, codebook size) is read off the
tensors, and the result is checked strictly: a key that this reader does not know, a weight the model needs
and the file lacks, or a shape that does not fit is a `CheckpointError` naming them.

Left out on purpose (known keys, not loaded): the decoder and post_quant_conv (OneToken only encodes), and
the quantizer's training statistics `codebook_used` and `embed_prob`. MGVQ's codebook
(`quantize.embedding.weight`, all groups' slices stacked) becomes `MultiGroupQuantizer.codebook`: both
match each group by cosine against its own slice of rows. To use the tokenizer in a model, put the config
into `HTCConfig(mgvq=...)` and load the state dict into `model.mgvq`.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from htcvlm.config import MGVQConfig
from htcvlm.errors import CheckpointError
from htcvlm.mgvq import MGVQ

logger = logging.getLogger(__name__)

# Published key -> OneToken key (inside MGVQ), outside the encoder's stages.
_FIXED = {
    "encoder.project_in.conv.conv.weight": "encoder.stem.conv.weight",
    "encoder.project_in.conv.conv.bias": "encoder.stem.conv.bias",
    "encoder.project_out.main.op_list.0.conv.weight": "encoder.head.weight",
    "encoder.project_out.main.op_list.0.conv.bias": "encoder.head.bias",
    "quant_conv.weight": "encoder.quant_conv.weight",
    "quant_conv.bias": "encoder.quant_conv.bias",
    "quantize.embedding.weight": "quantizer.codebook",
}
# Inside `encoder.stages.{s}.op_list.{j}.`: a residual conv block, a linear-attention block, or the
# downsampling that ends the stage.
_RES_BLOCK = {
    "main.conv1.conv.weight": "conv1.weight",
    "main.conv1.conv.bias": "conv1.bias",
    "main.conv2.conv.weight": "conv2.weight",
    "main.conv2.norm.weight": "norm.weight",
    "main.conv2.norm.bias": "norm.bias",
}
_ATTENTION_BLOCK = {
    "context_module.main.qkv.conv.weight": "attn.qkv.weight",
    "context_module.main.proj.conv.weight": "attn.proj.weight",
    "context_module.main.proj.norm.weight": "attn.norm.weight",
    "context_module.main.proj.norm.bias": "attn.norm.bias",
    "local_module.main.inverted_conv.conv.weight": "mlp.expand.weight",
    "local_module.main.inverted_conv.conv.bias": "mlp.expand.bias",
    "local_module.main.depth_conv.conv.weight": "mlp.depthwise.weight",
    "local_module.main.depth_conv.conv.bias": "mlp.depthwise.bias",
    "local_module.main.point_conv.conv.weight": "mlp.project.weight",
    "local_module.main.point_conv.norm.weight": "mlp.norm.weight",
    "local_module.main.point_conv.norm.bias": "mlp.norm.bias",
}
_DOWNSAMPLE = {"main.conv.conv.weight": "conv.weight", "main.conv.conv.bias": "conv.bias"}
_STAGE_KEY = re.compile(r"encoder\.stages\.(\d+)\.op_list\.(\d+)\.(.+)")
_UNUSED_PREFIXES = ("decoder.", "post_quant_conv.")
_UNUSED = {"quantize.codebook_used", "quantize.embed_prob"}  # the quantizer's training statistics


def read_mgvq(path: str | Path) -> tuple[MGVQConfig, dict[str, torch.Tensor]]:
    """A published MGVQ checkpoint -> its config (encoder "dcae") and state dict in `MGVQ`'s key names,
    checked strictly against an `MGVQ` of that config. Raises `CheckpointError` naming what does not fit."""
    return from_published(_load_published(Path(path)), str(path))


def from_published(
    published: dict[str, torch.Tensor], path: str = "MGVQ state dict"
) -> tuple[MGVQConfig, dict[str, torch.Tensor]]:
    """`read_mgvq` on a state dict already in memory (its tensors may be on the meta device); `path` names
    it in errors."""
    mapped, stages, unknown = _map_keys(published)
    if unknown:
        raise CheckpointError(f"{path}: keys that are not MGVQ's published encoder layout: {_names(unknown)}")
    config = _infer_config(path, mapped, stages)
    try:
        with torch.device("meta"):  # names and shapes only: no memory, no initialisation
            expected = {k: tuple(v.shape) for k, v in MGVQ(config).state_dict().items()}
    except ValueError as exc:
        raise CheckpointError(f"{path}: the tensors describe no buildable MGVQ encoder: {exc}") from exc
    # Errors name the published keys: those are what a reader of the file can find in it.
    missing = sorted(_published_name(k, config) for k in expected.keys() - mapped.keys())
    unexpected = sorted(_published_name(k, config) for k in mapped.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the encoder its tensors describe ({config}): "
            f"missing {_names(missing)}, unexpected {_names(unexpected)}"
        )
    wrong = [
        f"{_published_name(k, config)} {tuple(mapped[k].shape)} != {shape}"
        for k, shape in expected.items()
        if mapped[k].shape != shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: tensors of the wrong shape for {config}: {_names(wrong)}")
    return config, mapped


def load_mgvq(path: str | Path) -> MGVQ:
    """A published MGVQ checkpoint as a ready `MGVQ` (encoder "dcae", eval mode, on the CPU)."""
    config, state = read_mgvq(path)
    model = MGVQ(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_published(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"MGVQ checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers; it is not unpickled: {exc}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    return obj


def _map_keys(
    published: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, list[int]]], list[str]]:
    """Published state -> (OneToken state, per OneToken stage the op_list indices of its "res" and
    "attention" blocks and its "down" layer, published keys of no known place)."""
    mapped: dict[str, torch.Tensor] = {}
    stages: dict[int, dict[str, list[int]]] = {}
    unknown: list[str] = []
    for key, tensor in published.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            unknown.append(str(key))
        elif key in _FIXED:
            mapped[_FIXED[key]] = tensor
        elif key in _UNUSED or key.startswith(_UNUSED_PREFIXES):
            continue
        elif (m := _STAGE_KEY.fullmatch(key)) and int(m[1]) > 0:
            # Published stage 0 is empty in every released encoder (the stem downsamples first): s -> s - 1.
            stage, index, rest = int(m[1]) - 1, int(m[2]), m[3]
            kinds = stages.setdefault(stage, {"res": [], "attention": [], "down": []})
            prefix = f"encoder.stages.{stage}"
            for kind, table, name in (
                ("res", _RES_BLOCK, f"{prefix}.blocks.{index}."),
                ("attention", _ATTENTION_BLOCK, f"{prefix}.blocks.{index}."),
                ("down", _DOWNSAMPLE, f"{prefix}.down."),
            ):
                if rest in table:
                    mapped[name + table[rest]] = tensor
                    kinds[kind].append(index)
                    break
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return mapped, stages, unknown


def _infer_config(
    path: str, state: dict[str, torch.Tensor], stages: dict[int, dict[str, list[int]]]
) -> MGVQConfig:
    """The geometry that the tensors describe."""
    for key in ("encoder.quant_conv.weight", "quantizer.codebook"):
        if key not in state:
            raise CheckpointError(f"{path} lacks {_published_name(key)}")
    if sorted(stages) != list(range(len(stages))) or not stages:
        raise CheckpointError(f"{path}: encoder stages {[s + 1 for s in sorted(stages)]} are not 1..n")
    widths, depths, attention = [], [], []
    for s in range(len(stages)):
        kinds = stages[s]
        if kinds["res"] and kinds["attention"]:
            raise CheckpointError(f"{path}: encoder stage {s + 1} mixes residual and attention blocks")
        blocks = kinds["res"] or kinds["attention"]
        if not blocks:
            raise CheckpointError(f"{path}: encoder stage {s + 1} has no blocks")
        depth = max(blocks) + 1
        if any(i != depth for i in kinds["down"]):
            raise CheckpointError(
                f"{path}: encoder stage {s + 1} downsamples at {kinds['down']}, not {depth}"
            )
        widths.append(_stage_width(path, state, s, blocks))
        depths.append(depth)
        attention.append(bool(kinds["attention"]))
    n_attention = sum(attention)
    if attention != [False] * (len(attention) - n_attention) + [True] * n_attention:
        raise CheckpointError(f"{path}: attention stages {attention} are not the last ones")
    quant_conv, codebook = state["encoder.quant_conv.weight"], state["quantizer.codebook"]
    if quant_conv.dim() != 4 or codebook.dim() != 2:
        raise CheckpointError(
            f"{path}: quant_conv {tuple(quant_conv.shape)} or codebook {tuple(codebook.shape)}"
        )
    channels, per_group = quant_conv.shape[0], quant_conv.shape[1]  # grouped conv weight (C, C / G, 1, 1)
    if per_group == 0 or channels % per_group or codebook.shape[1] != per_group:
        raise CheckpointError(
            f"{path}: quant_conv {tuple(quant_conv.shape)} and codebook {tuple(codebook.shape)} disagree "
            "on the group size"
        )
    try:
        return MGVQConfig(
            encoder="dcae",
            downsample=2 ** len(widths),
            latent_channels=channels,
            groups=channels // per_group,
            codebook_size=codebook.shape[0],
            stage_widths=tuple(widths),
            stage_depths=tuple(depths),
            attention_stages=n_attention,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: the tensors describe no valid MGVQ encoder: {exc}") from exc


def _stage_width(path: str, state: dict[str, torch.Tensor], stage: int, blocks: list[int]) -> int:
    """The width of a stage, from the first of its blocks' tensors that shows it."""
    shown_by = (("conv1.weight", 1), ("norm.weight", 0), ("attn.qkv.weight", 1), ("attn.norm.weight", 0))
    for index in sorted(set(blocks)):
        for name, dim in shown_by:
            if (tensor := state.get(f"encoder.stages.{stage}.blocks.{index}.{name}")) is not None:
                return tensor.shape[dim]
    raise CheckpointError(f"{path}: no tensor of encoder stage {stage + 1} shows its width")


def _published_name(key: str, config: MGVQConfig | None = None) -> str:
    """The published key of a OneToken key (itself where it has none)."""
    fixed = {ours: theirs for theirs, ours in _FIXED.items()}
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.(?:blocks\.(\d+)|down)\.(.+)", key)
    if m is None or config is None:
        return key
    stage = int(m[1])
    if m[2] is None:
        table, index = _DOWNSAMPLE, config.stage_depths[stage]
    else:
        attention = stage >= len(config.stage_widths) - config.attention_stages
        table, index = (_ATTENTION_BLOCK if attention else _RES_BLOCK), int(m[2])
    inverse = {ours: theirs for theirs, ours in table.items()}
    return f"encoder.stages.{stage + 1}.op_list.{index}.{inverse[m[3]]}" if m[3] in inverse else key


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... {len(keys) - limit} more' if len(keys) > limit else ''}]"
