"""What a training run trains with: `TrainConfig` and its named recipes, and the variants of Table 4.

`TrainConfig.from_name("tiny")` is the recipe of the shipped model (docs/TRAINING.md); `onetoken train`
starts from a named recipe and changes only the fields given as flags, and bench/bench_train.py
projects the wall time of the same recipe.

Variants with one budget: `hybrid` (the method), `continuous` (VoCo-LLaMA), `discrete` (MGVQ tokens
only), and `upper` (no compression: text attends every visual token). The lower bound is the upper
model's weights evaluated through the voco bottleneck (see evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from htcvlm.config import HTCConfig

Variant = Literal["hybrid", "continuous", "discrete", "upper"]
VARIANTS: tuple[Variant, ...] = ("upper", "hybrid", "continuous", "discrete")


@dataclass(frozen=True)
class TrainConfig:
    """Steps, learning rates and data of the three stages. The defaults are the `tiny` recipe."""

    steps: int = 2000  # stage 2; 0 stops after stages 1 and 0, a start for variants' stage 2 (init_from)
    batch_size: int = 128  # images a step, in every stage (stage 2: each with its packed questions)
    lr: float = 1e-3  # stage 2's peak
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * this
    warmup: int = 200  # linear warm-up steps, in every stage
    weight_decay: float = 0.01  # stages 0 and 2 (stage 2: matrices only)
    grad_clip: float = 1.0  # stages 0 and 2
    easy_steps: int = 300  # curriculum: the first steps draw only the pool's single-object samples
    mgvq_steps: int = 300  # stage 1: MGVQ on reconstruction, then frozen
    mgvq_lr: float = 2e-3
    vision_steps: int = 2000  # stage 0: the vision tower on per-cell scene labels (a stand-in for CLIP)
    vision_lr: float = 2e-3
    freeze_vision: bool = True  # stage 2 keeps the tower stage 0 trained, as LLaVA keeps CLIP frozen
    eval_every: int = 500  # stage-2 steps between validations (and saved training states)
    seed: int = 0
    bf16: bool = False  # autocast on GPU hosts
    grad_checkpointing: bool = False  # trade compute for memory on GPU hosts
    pool: int = 100000  # pre-rendered procedural training images
    easy: int = 10000  # single-object images beside them, for the curriculum
    questions: int = 4  # questions per training image, packed into one row after its compressed prefix
    val_size: int = 500  # validation samples scored at each validation
    lora_rank: int = 0  # > 0: stage 2 trains LoRA adapters of this rank on the LLM (merged when saved)
    multi_rows: int = 0  # stage 2: rows a step of one question over k pool images (htcvlm/data/multi.py)
    multi_images: int = 8  # the most images of a multi-image row; k is uniform in 1 … this
    multi_step_images: int = 0  # > 0: a step's multi-image rows share this many pool images (0: any)
    # the kinds a multi-image row asks, drawn uniformly from this list (one listed twice: twice as often)
    multi_kinds: tuple[str, ...] = ("count", "find", "compare")
    contrastive: float = 0.0  # stage 2: weight of InfoNCE over two views' voco latents (0: off)
    contrastive_images: int = 64  # images a step for it, two augmented views each
    # text tokens a row keeps on the Ray Train path (fixed-width rows); a longer row keeps its first
    # conversations whole and the head of the one the cut falls in, counted as `cut_rows` each step
    max_text: int = 256

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.questions < 1:
            raise ValueError(f"questions must be >= 1, got {self.questions}")
        from htcvlm.data.multi import (  # not at import: the CLI reads this file early
            MAX_QUESTION_IMAGES,
            MULTI_QTYPES,
        )

        if self.multi_rows < 0 or not 1 <= self.multi_images <= MAX_QUESTION_IMAGES:
            raise ValueError(
                f"multi_rows must be >= 0 and multi_images in [1, {MAX_QUESTION_IMAGES}], "
                f"got {self.multi_rows}, {self.multi_images}"
            )
        object.__setattr__(self, "multi_kinds", tuple(self.multi_kinds))  # a list when read from JSON
        if not self.multi_kinds or not set(self.multi_kinds) <= set(MULTI_QTYPES):
            raise ValueError(f"multi_kinds must be some of {MULTI_QTYPES}, got {self.multi_kinds}")
        if self.multi_step_images and self.multi_step_images < self.multi_images:
            raise ValueError(
                f"multi_step_images must be 0 or at least multi_images ({self.multi_images}), "
                f"got {self.multi_step_images}"
            )
        if self.contrastive < 0 or self.contrastive_images < 2:
            raise ValueError(
                f"contrastive must be >= 0 and contrastive_images >= 2, got "
                f"{self.contrastive}, {self.contrastive_images}"
            )
        if self.max_text < 1:
            raise ValueError(f"max_text must be >= 1, got {self.max_text}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TrainConfig:
        """The named recipe, with `overrides` changed."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
        return replace(RECIPES[name], **overrides)


RECIPES: dict[str, TrainConfig] = {
    # The shipped model's: 95.0 % of 1,000 procedural test questions, about 43 minutes on 2 CPU cores.
    "tiny": TrainConfig(),
}


def variant_config(base: HTCConfig, variant: Variant) -> HTCConfig:
    """The model config each variant trains: channels follow the variant; `upper` keeps hybrid inputs."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    channels = "hybrid" if variant == "upper" else variant
    return base.with_(channels=channels)
