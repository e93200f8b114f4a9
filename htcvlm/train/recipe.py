"""What a training run trains with: `TrainConfig`, and the variants of the paper's Table 4.

Variants with one budget: `hybrid` (the method), `continuous` (VoCo-LLaMA), `discrete` (MGVQ tokens
only), and `upper` (no compression: text attends every visual token). The lower bound is the upper
model's weights evaluated through the voco bottleneck (see evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from htcvlm.config import HTCConfig

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
