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
MGVQEncoder = Literal["conv", "dcae"]
ResizeMode = Literal["square", "shortest_edge"]

# CLIP's pixel statistics (OpenAI's training set): the vision tower expects images normalized by them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Field metadata of a setting added after checkpoints were fingerprinted: to_dict() leaves it out while it
# holds its default, so those checkpoints keep their fingerprint and their config.json still loads.
OMIT_AT_DEFAULT = {"omit_at_default": True}


def _check_literal(name: str, value: str, allowed: Any) -> None:
    options = get_args(allowed)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _triple(name: str, value: Any, kind: type) -> tuple[Any, Any, Any]:
    """A JSON list (or tuple) of three numbers as a tuple of `kind`, so configs compare equal."""
    if len(value) != 3:
        raise ValueError(f"{name} needs one value per RGB channel, got {value!r}")
    return tuple(kind(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageProcessing:
    """How a decoded RGB image becomes the (3, S, S) pixels in [0, 1] that both channels see (S =
    image_size); each channel then normalizes them its own way (the vision tower: VisionConfig.image_mean).

    The defaults are the tiny model's: padded to a square with grey, the square resized to S. LLaVA-1.5
    pads with CLIP's mean colour (122, 116, 104), then runs transformers' CLIPImageProcessor: the shortest
    edge resized to S (bicubic) and the centre S x S cropped, which on a padded square is the same resize.
    """

    pad_to_square: bool = True  # LLaVA's expand2square: the whole image stays visible
    pad_colour: tuple[int, int, int] = (127, 127, 127)
    # "square": the (padded) image resized to S x S. "shortest_edge": CLIPImageProcessor's resize of the
    # shortest edge to S, aspect kept, then a centre crop of S x S.
    resize: ResizeMode = "square"

    def __post_init__(self) -> None:
        _check_literal("resize", self.resize, ResizeMode)
        colour = _triple("pad_colour", self.pad_colour, int)
        if not all(0 <= c <= 255 for c in colour):
            raise ValueError(f"pad_colour values must be 0..255, got {self.pad_colour!r}")
        object.__setattr__(self, "pad_colour", colour)


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
    # The tower's input normalization, (pixel - mean) / std per RGB channel: CLIP's unless a checkpoint says.
    image_mean: tuple[float, float, float] = field(default=CLIP_MEAN, metadata=OMIT_AT_DEFAULT)
    image_std: tuple[float, float, float] = field(default=CLIP_STD, metadata=OMIT_AT_DEFAULT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", _triple("image_mean", self.image_mean, float))
        object.__setattr__(self, "image_std", _triple("image_std", self.image_std, float))
        if not all(s > 0 for s in self.image_std):
            raise ValueError(f"image_std values must be positive, got {self.image_std!r}")


@dataclass(frozen=True)
class MGVQConfig:
    """The multi-group VQ tokenizer of the discrete channel."""

    downsample: int = 16  # spatial reduction: 336 px -> 21 x 21 latent positions
    latent_channels: int = 32
    groups: int = 8  # channels split into groups, each matched against its own codebook slice
    codebook_size: int = 16384  # entries of the one codebook, across all groups
    base_channels: int = 128  # width of the first conv stage; doubles with each downsampling
    commitment: float = 0.25  # beta of the commitment loss (VQ-VAE)
    # "conv": the small conv stack trained here (base_channels). "dcae": the published MGVQ encoder
    # (htcvlm/mgvq_dcae.py), built to load MGVQ's released checkpoints (htcvlm/formats/mgvq.py).
    encoder: MGVQEncoder = field(default="conv", metadata=OMIT_AT_DEFAULT)
    # "dcae" only, the paper's f16 tokenizer by default: after a stem that halves the image, one stage per
    # width and depth, each but the last ending in a 2x downsampling (MGVQ's width_list and depth_list
    # less their unused stage 0); the last `attention_stages` stages use linear-attention blocks.
    stage_widths: tuple[int, ...] = field(default=(256, 512, 512, 1024), metadata=OMIT_AT_DEFAULT)
    stage_depths: tuple[int, ...] = field(default=(4, 8, 2, 2), metadata=OMIT_AT_DEFAULT)
    attention_stages: int = field(default=2, metadata=OMIT_AT_DEFAULT)

    def __post_init__(self) -> None:
        _check_literal("encoder", self.encoder, MGVQEncoder)
        # JSON gives lists: hold tuples, so that configs compare and hash by value
        object.__setattr__(self, "stage_widths", tuple(self.stage_widths))
        object.__setattr__(self, "stage_depths", tuple(self.stage_depths))
        if self.encoder == "dcae":
            self._check_dcae()
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.latent_channels % self.groups:
            raise ValueError(f"latent_channels {self.latent_channels} not divisible by groups {self.groups}")
        if self.codebook_size % self.groups:
            raise ValueError(f"codebook_size {self.codebook_size} not divisible by groups {self.groups}")

    def _check_dcae(self) -> None:
        n = len(self.stage_widths)
        if n == 0 or len(self.stage_depths) != n:
            raise ValueError(f"stage_widths {self.stage_widths} and stage_depths {self.stage_depths} differ")
        if min(self.stage_depths) < 1:
            raise ValueError(f"every stage needs a block, got stage_depths {self.stage_depths}")
        if self.downsample != 2**n:
            raise ValueError(f"{n} stages downsample by {2**n}, not {self.downsample}")
        if not 0 <= self.attention_stages <= n:
            raise ValueError(f"attention_stages {self.attention_stages} not within 0..{n} stages")


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

        [BOS] · before_image · V_hy · separator · voco · prompt(q) · answer [· next_prompt(q2) · answer2 …]

    The text before the image is the same for every image: its key/value state is computed once per model
    and shared by every record. The separator, like V_hy, is never seen by text, so a record stays the
    voco tokens' state alone. Texts are tokenized piece by piece without special tokens, as LLaVA tokenizes
    the chunks around `<image>`; `{system}` in before_image and prompt stands for `system`, `{question}`
    in prompt (and in next_prompt, a conversation's later turns) for the asked question. The defaults are
    the tiny model's [V_hy; voco; "Question: … Answer:"].
    """

    bos: bool = field(default=False, metadata=OMIT_AT_DEFAULT)  # the tokenizer's BOS at position 0
    system: str = field(default="", metadata=OMIT_AT_DEFAULT)  # the system prompt
    # Fixed text between BOS and V_hy (LLaVA-built: "{system} USER: ").
    before_image: str = field(default="", metadata=OMIT_AT_DEFAULT)
    separator: str = field(default="", metadata=OMIT_AT_DEFAULT)  # between V_hy and voco (VoCo-LLaMA: "\n")
    # Everything after the voco tokens (VoCo-LLaMA: "\n{system} USER: {question} ASSISTANT:").
    prompt: str = field(default="Question: {question}\nAnswer:", metadata=OMIT_AT_DEFAULT)
    # A later turn of a conversation, right after the answer before it and its stop token (LLaVA-1.5's
    # vicuna_v1: "USER: {question} ASSISTANT:"); empty: `prompt` again. Training packs conversations so.
    next_prompt: str = field(default="", metadata=OMIT_AT_DEFAULT)
    # In a question about several images, the text right after image i's voco tokens, `{i}` its number
    # from 1 (e.g. " (image {i})"): it reads the voco tokens before it, so "image 3" in a question can
    # be found by content rather than by a distance that changes with the number of images. Empty: none.
    # A question about one image never has one.
    image_marker: str = field(default="", metadata=OMIT_AT_DEFAULT)
    # Whether text attends [BOS] + before_image (LLaVA-built) or only keys from the first voco on
    # (VoCo-LLaMA). Text never attends V_hy or the separator either way.
    text_attends_prefix: bool = field(default=True, metadata=OMIT_AT_DEFAULT)
    # Tokens besides EOS that end an answer (not part of it), each one token of the vocabulary.
    stop_tokens: tuple[str, ...] = field(default=(), metadata=OMIT_AT_DEFAULT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))  # JSON gives a list
        if self.prompt.count("{question}") != 1:
            raise ValueError(f"prompt must hold '{{question}}' exactly once, got {self.prompt!r}")
        if self.next_prompt and self.next_prompt.count("{question}") != 1:
            raise ValueError(f"next_prompt must hold '{{question}}' exactly once, got {self.next_prompt!r}")
        if self.image_marker and self.image_marker.count("{i}") != 1:
            raise ValueError(f"image_marker must hold '{{i}}' exactly once, got {self.image_marker!r}")
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
    preprocess: ImageProcessing = field(default_factory=ImageProcessing, metadata=OMIT_AT_DEFAULT)
    layout: LayoutConfig = field(default_factory=LayoutConfig, metadata=OMIT_AT_DEFAULT)
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
        """Every setting except the derived fields and OMIT_AT_DEFAULT fields that hold their default."""
        return _settings(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HTCConfig:
        data = dict(data)
        nested = {
            "vision": VisionConfig,
            "mgvq": MGVQConfig,
            "llm": LLMConfig,
            "preprocess": ImageProcessing,
            "layout": LayoutConfig,
        }
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


def _default_of(f: Field[Any]) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _settings(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if not f.init or (f.metadata.get("omit_at_default") and value == _default_of(f)):
            continue
        out[f.name] = _settings(value) if is_dataclass(value) else value
    return out


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
