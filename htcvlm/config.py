"""HTC-VLM configuration: frozen dataclasses with named presets.

`HTCConfig.from_name("paper" | "tiny" | "bench")` gives the three geometries of DESIGN.md; every other
field is derived in `__post_init__`, so a config is always self-consistent and validated once.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, get_args

ChannelMode = Literal["hybrid", "continuous", "discrete"]
FusionMode = Literal["pre", "post", "mean"]
VisualAttention = Literal["isolated", "causal"]
ProjectorKind = Literal["linear", "mlp2x_gelu"]


# Field metadata of settings added after models were shipped: at its default such a field stays out of
# `to_dict()`, so the JSON (and the fingerprint hashed from it) of every older model is unchanged, and
# an older config.json without the field loads as the default.
OMIT_IF_DEFAULT = {"omit_if_default": True}


def _check_literal(name: str, value: str, allowed: Any) -> None:
    options = get_args(allowed)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _default_of(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data: nested configs as dicts, tuples as lists; derived
    fields and `OMIT_IF_DEFAULT` fields at their default left out."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if not f.init or (f.metadata.get("omit_if_default") and value == _default_of(f)):
            continue
        out[f.name] = (
            _to_dict(value) if is_dataclass(value) else list(value) if isinstance(value, tuple) else value
        )
    return out


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT of the continuous channel (transformers `CLIPVisionModel`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    # LLaVA's choice: the penultimate layer's patch tokens carry more spatial detail than the last.
    select_layer: int = -2
    # "patch": CLIP's own linear patch embedding. "conv": a small stride-2 conv stack in its place, which
    # learns edges and colors far faster from scratch on small images (the tiny model's choice).
    stem: Literal["patch", "conv"] = "patch"
    path: str | None = None  # local Hugging Face directory of a pretrained CLIP vision tower


@dataclass(frozen=True)
class MGVQConfig:
    """The multi-group VQ tokenizer of the discrete channel."""

    downsample: int = 16  # spatial reduction: 336 px -> 21 x 21 latent positions
    latent_channels: int = 32
    groups: int = 8  # channels split into groups, each matched against its own codebook slice
    codebook_size: int = 16384  # entries of the one codebook, across all groups
    base_channels: int = 128  # width of the first conv stage; doubles with each downsampling
    commitment: float = 0.25  # beta of the commitment loss (VQ-VAE)

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.latent_channels % self.groups:
            raise ValueError(f"latent_channels {self.latent_channels} not divisible by groups {self.groups}")
        if self.codebook_size % self.groups:
            raise ValueError(f"codebook_size {self.codebook_size} not divisible by groups {self.groups}")


@dataclass(frozen=True)
class LLMConfig:
    """A LLaMA-family causal LM, driven by `inputs_embeds`."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    path: str | None = None  # local Hugging Face directory of a pretrained causal LM (and its tokenizer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class LayoutConfig:
    """The LLM's sequence around the image, a checkpoint's prompt format:

        [BOS] · before_image · V_hy · separator · voco · prompt(question)

    The text before the image is the same for every image: its key/value state is computed once per model
    and shared by every record. The separator, like V_hy, is never seen by text, so a record stays the
    voco tokens' state alone. Texts are tokenized piece by piece without special tokens, as LLaVA tokenizes
    the chunks around `<image>`; `{system}` in before_image and prompt stands for `system`, `{question}`
    in prompt for the asked question. The defaults are the tiny model's [V_hy; voco; "Question: … Answer:"].
    """

    bos: bool = field(default=False, metadata=OMIT_IF_DEFAULT)  # the tokenizer's BOS at position 0
    system: str = field(default="", metadata=OMIT_IF_DEFAULT)  # the system prompt
    # Fixed text between BOS and V_hy (LLaVA-built: "{system} USER: ").
    before_image: str = field(default="", metadata=OMIT_IF_DEFAULT)
    separator: str = field(default="", metadata=OMIT_IF_DEFAULT)  # between V_hy and voco (VoCo-LLaMA: "\n")
    # Everything after the voco tokens (VoCo-LLaMA: "\n{system} USER: {question} ASSISTANT:").
    prompt: str = field(default="Question: {question}\nAnswer:", metadata=OMIT_IF_DEFAULT)
    # Whether text attends [BOS] + before_image (LLaVA-built) or only keys from the first voco on
    # (VoCo-LLaMA). Text never attends V_hy or the separator either way.
    text_attends_prefix: bool = field(default=True, metadata=OMIT_IF_DEFAULT)
    # Tokens besides EOS that end an answer (not part of it), each one token of the vocabulary.
    stop_tokens: tuple[str, ...] = field(default=(), metadata=OMIT_IF_DEFAULT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))  # JSON gives a list
        if self.prompt.count("{question}") != 1:
            raise ValueError(f"prompt must hold '{{question}}' exactly once, got {self.prompt!r}")
        if "{question}" in self.before_image + self.separator + self.system:
            raise ValueError("'{question}' belongs in prompt only: the text before the voco is per model")
        if not all(isinstance(t, str) and t for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be non-empty token strings, got {self.stop_tokens!r}")

    def with_system(self, text: str) -> str:
        return text.replace("{system}", self.system)


@dataclass(frozen=True)
class HTCConfig:
    name: str = "custom"
    image_size: int = 336
    vision: VisionConfig = field(default_factory=VisionConfig)
    mgvq: MGVQConfig = field(default_factory=MGVQConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorKind = "linear"  # P_v: the paper's linear map, or LLaVA-1.5's two-layer GELU MLP
    n_discrete: int = 4  # N_d: discrete anchor tokens made by P_d
    pd_hidden: int = 16384  # width of W1 in P_d (Eq. 4)
    channels: ChannelMode = "hybrid"
    fusion: FusionMode = "pre"
    n_voco: int = 1
    visual_attention: VisualAttention = "isolated"  # Eq. 6: each V_hy token sees only itself
    layout: LayoutConfig = field(default_factory=LayoutConfig, metadata=OMIT_IF_DEFAULT)
    # Derived in __post_init__.
    n_patches: int = field(init=False)
    latent_side: int = field(init=False)
    q_dim: int = field(init=False)
    n_visual: int = field(init=False)

    def __post_init__(self) -> None:
        _check_literal("projector", self.projector, ProjectorKind)
        _check_literal("channels", self.channels, ChannelMode)
        _check_literal("fusion", self.fusion, FusionMode)
        _check_literal("visual_attention", self.visual_attention, VisualAttention)
        if self.image_size % self.vision.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch {self.vision.patch_size}")
        if self.image_size % self.mgvq.downsample:
            raise ValueError(
                f"image_size {self.image_size} not divisible by downsample {self.mgvq.downsample}"
            )
        if self.n_voco < 1:
            raise ValueError(f"n_voco must be >= 1, got {self.n_voco}")
        if self.n_discrete < 1:
            raise ValueError(f"n_discrete must be >= 1, got {self.n_discrete}")
        if self.llm.hidden_size % self.llm.num_heads or self.llm.num_heads % self.llm.num_kv_heads:
            raise ValueError(
                f"LLM heads do not divide: hidden {self.llm.hidden_size}, heads {self.llm.num_heads}, "
                f"kv heads {self.llm.num_kv_heads}"
            )
        set_ = object.__setattr__  # frozen: derived fields are written once, here
        set_(self, "n_patches", (self.image_size // self.vision.patch_size) ** 2)
        set_(self, "latent_side", self.image_size // self.mgvq.downsample)
        set_(self, "q_dim", self.mgvq.latent_channels * self.latent_side**2)
        set_(self, "n_visual", self._count_visual_tokens())

    def _count_visual_tokens(self) -> int:
        """len(V_hy): the image's tokens in the LLM's sequence."""
        if self.channels == "continuous":
            return self.n_patches
        if self.channels == "discrete":
            return self.latent_side**2  # one token per MGVQ latent position (441 at 336 px)
        if self.fusion == "mean":
            return self.n_patches  # the anchors are averaged into every patch token
        return self.n_discrete + self.n_patches

    @property
    def kv_values_per_image(self) -> int:
        """Values of key/value state kept per image: layers x (k, v) x kv_heads x head_dim x n_voco."""
        llm = self.llm
        return llm.num_layers * 2 * llm.num_kv_heads * llm.head_dim * self.n_voco

    def with_(self, **changes: Any) -> HTCConfig:
        """A copy with top-level fields changed (derived fields are recomputed)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HTCConfig:
        data = dict(data)
        nested = {"vision": VisionConfig, "mgvq": MGVQConfig, "llm": LLMConfig, "layout": LayoutConfig}
        for key, sub in nested.items():
            if key in data:
                data[key] = sub(**data[key])
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> HTCConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, HTCConfig] = {
    # The paper's geometry: CLIP ViT-L/14 at 336 px (576 patches), MGVQ 16x / 32 ch / 8 groups / 16384
    # codes (q in R^14112), P_d 14112 -> 16384 -> 4 x 4096, LLaMA-7B.
    "paper": HTCConfig(name="paper"),
    # Trained on two CPU cores and shipped as the default model.
    "tiny": HTCConfig(
        name="tiny",
        image_size=64,
        # Trained from scratch, the last layer has no contrastive specialization to avoid: use it, and
        # compute no layer whose output is thrown away.
        vision=VisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_layers=3,
            num_heads=4,
            patch_size=8,
            select_layer=-1,
            stem="conv",
        ),
        mgvq=MGVQConfig(downsample=16, latent_channels=32, groups=8, codebook_size=1024, base_channels=32),
        llm=LLMConfig(
            hidden_size=128,
            intermediate_size=384,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            vocab_size=512,
            max_position_embeddings=512,
        ),
        pd_hidden=512,
    ),
    # The paper's token count (576 patches + 4 anchors) at small widths: for timing ratios on a CPU.
    "bench": HTCConfig(
        name="bench",
        image_size=336,
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, patch_size=14),
        mgvq=MGVQConfig(base_channels=16),
        llm=LLMConfig(
            hidden_size=512,
            intermediate_size=1376,
            num_layers=8,
            num_heads=8,
            num_kv_heads=8,
            vocab_size=512,
            max_position_embeddings=1024,
        ),
        pd_hidden=1024,
    ),
}
