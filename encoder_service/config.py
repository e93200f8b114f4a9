"""Encoder configuration: one frozen dataclass, read from flags and environment only in the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from cache.dtypes import KvDtype
from htcvlm.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MODEL_DIR

Backend = Literal["ray", "local"]


@dataclass(frozen=True)
class EncoderConfig:
    model_dir: str = str(DEFAULT_MODEL_DIR)  # a OneToken checkpoint folder
    kv_dtype: KvDtype = "fp16"
    backend: Backend = "ray"  # "local": in-process, no Ray (tests, small setups)
    num_actors: int = 1  # 0: one per GPU the Ray cluster has (`pool.actor_count`), or one without GPUs
    num_gpus_per_actor: float | None = None  # None: 1 where Ray sees GPUs, else CPU actors
    max_batch: int = 16  # dynamic batcher: images per compress() call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_queue: int = 1024  # images waiting before QueueFullError
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"  # auto: cuda when the process sees a GPU
    ray_address: str | None = None  # None: join a running local Ray or start one
    batch_timeout_s: float = 120.0  # one batch, retries on restarted actors included

    def __post_init__(self) -> None:
        if self.backend not in get_args(Backend):
            raise ValueError(f"backend must be one of {get_args(Backend)}, got {self.backend!r}")
        if self.kv_dtype not in get_args(KvDtype):
            raise ValueError(f"kv_dtype must be one of {get_args(KvDtype)}, got {self.kv_dtype!r}")
        from PIL import Image  # Pillow's own bomb limit caps ours: it refuses larger images itself

        if self.max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"max_pixels can be at most Pillow's {2 * Image.MAX_IMAGE_PIXELS}, got {self.max_pixels}"
            )
        if self.num_actors < 0:
            raise ValueError(
                f"num_actors must be >= 0 (0: one per GPU of the cluster), got {self.num_actors}"
            )
        for name in ("max_batch", "max_queue", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.batch_timeout_s <= 0:
            raise ValueError(f"need max_wait_ms >= 0 and batch_timeout_s > 0, got {self}")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ValueError(f"num_gpus_per_actor must be >= 0, got {self.num_gpus_per_actor}")
