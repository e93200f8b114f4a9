"""Stage 2's data as a stream of positions, for distributed training: what every worker reads at every
step is a pure function of (seed, step, rank), so a resumed run reads exactly what an uninterrupted one
would, and N workers together read what one worker reads. Nothing here imports Ray: `distributed` wires
these pieces into Ray Data and Ray Train.

- `StepPlan`: the global batch split into N workers × accumulation micro-batches; which global positions
  each worker reads, in order
- `ProceduralSource` / `LlavaSource`: which sample a global position is (the row the single-process
  trainer draws for it, `step_rows`), and the sample itself (a LLaVA image with every
  conversation about it packed, each its own segment)
- `SampleRows`: the Ray Data stage, positions -> rows as the model reads them (rendered or decoded image,
  token ids), with a bad image (missing, corrupt) turned into an `ok=False` row that scores nothing
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image

from htcvlm.checkpoint import load_tokenizer
from htcvlm.config import HTCConfig
from htcvlm.data.dataset import ProceduralVQA, VQASample
from htcvlm.data.llava import ImageConversations, image_path, image_sample, open_rgb
from htcvlm.data.multi import ImageFacts, facts_of_scene
from htcvlm.model import new_model
from htcvlm.pool import EASY_WEIGHTS, tensorize
from htcvlm.train.data import step_rows
from htcvlm.train.features import FeatureCache, blank_sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step reads `batch_size` global positions, [step * batch_size, (step + 1) * batch_size).
    Worker r's a-th micro-batch of a step is the step's slice starting at (a * workers + r) * micro_batch,
    so the step's batch is the same for every worker count, and the learning rate with it."""

    batch_size: int  # the recipe's global batch
    workers: int
    micro_batch: int  # rows one worker runs through the model at once

    def __post_init__(self) -> None:
        if self.workers < 1 or self.micro_batch < 1:
            raise ValueError(f"workers and micro_batch must be >= 1, got {self.workers}, {self.micro_batch}")
        if self.batch_size % (self.workers * self.micro_batch):
            raise ValueError(
                f"the global batch {self.batch_size} must be a multiple of workers × micro-batch = "
                f"{self.workers} × {self.micro_batch}"
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches each worker accumulates per optimizer step."""
        return self.batch_size // (self.workers * self.micro_batch)

    @property
    def rows_per_step(self) -> int:
        """Rows one worker reads per optimizer step."""
        return self.accumulation * self.micro_batch

    def positions(self, rank: int, start_step: int, rows: np.ndarray) -> np.ndarray:
        """Worker `rank`'s k-th row from `start_step` (k = `rows`, any shape) -> its global position."""
        if not 0 <= rank < self.workers:
            raise ValueError(f"rank must be in [0, {self.workers}), got {rank}")
        step = start_step + rows // self.rows_per_step
        micro, within = (rows % self.rows_per_step) // self.micro_batch, rows % self.micro_batch
        return step * self.batch_size + (micro * self.workers + rank) * self.micro_batch + within


def drawn(
    positions: np.ndarray, batch_size: int, seed: int, n: int, n_easy: int = 0, easy_steps: int = 0
) -> np.ndarray:
    """The sample at each global position: position p is row p % batch_size of step p // batch_size's
    batch as the single-process trainer draws it (`step_rows`), so both paths read the same order."""
    steps, within = np.divmod(positions, batch_size)
    out = np.empty_like(positions)
    for step in np.unique(steps):
        at = steps == step
        out[at] = step_rows(seed, int(step), batch_size, n, n_easy, easy_steps).numpy()[within[at]]
    return out


@dataclass(frozen=True)
class ProceduralSource:
    """The procedural training set, rendered on the fly: `pool` scenes of the train split and `easy`
    single-object ones after them (as `procedural_pool` lays them out); the first `easy_steps` steps
    draw only from the single-object ones (the recipe's curriculum)."""

    pool: int
    easy: int
    questions: int
    easy_steps: int
    batch_size: int
    seed: int

    def __len__(self) -> int:
        return self.pool + self.easy

    @property
    def segments(self) -> int:
        """The most segments a sample's row packs: its questions."""
        return self.questions

    def indices(self, positions: np.ndarray) -> np.ndarray:
        return drawn(positions, self.batch_size, self.seed, len(self), self.easy, self.easy_steps)

    def _sets(self, image_size: int = 64) -> tuple[ProceduralVQA, ProceduralVQA]:
        main = ProceduralVQA("train", self.pool, image_size, questions=self.questions)
        single = ProceduralVQA(
            "train",
            self.easy,
            image_size,
            weights=EASY_WEIGHTS,
            seed=1,
            max_objects=1,
            questions=self.questions,
        )
        return main, single

    def samples(self, indices: np.ndarray, image_size: int, images: bool = True) -> list[VQASample | None]:
        """The samples at `indices`; images=False leaves the scenes unrendered (black), for rows whose
        features come from a feature cache (rendering is most of a row's cost)."""
        main, single = self._sets(image_size)
        return [
            main.sample(i, images) if i < self.pool else single.sample(i - self.pool, images)
            for i in map(int, indices)
        ]

    def images_key(self) -> dict[str, Any]:
        """What fixes the images, index by index (a feature cache's key)."""
        return {"procedural": {"pool": self.pool, "easy": self.easy}}

    def facts(self) -> SourceFacts:
        """What multi-image questions ask about each sample, as `facts_of_cells` gives it for the
        pre-rendered pool of the same layout, each drawn (not rendered) when first read."""
        return SourceFacts(self)


class SourceFacts(Sequence[ImageFacts]):
    """A procedural source's `ImageFacts` by index, each scene drawn on first use and kept: a step's
    multi-image rows read a few hundred of them, never the whole pool."""

    def __init__(self, source: ProceduralSource) -> None:
        self.main, self.single = source._sets()
        self.n_main = source.pool
        self.known: dict[int, ImageFacts] = {}

    def __len__(self) -> int:
        return len(self.main) + len(self.single)

    @overload
    def __getitem__(self, index: int) -> ImageFacts: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ImageFacts]: ...
    def __getitem__(self, index: int | slice) -> ImageFacts | Sequence[ImageFacts]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if index not in self.known:
            data, at = (self.main, index) if index < self.n_main else (self.single, index - self.n_main)
            self.known[index] = facts_of_scene(data.draw(at)[0])
        return self.known[index]


@dataclass(frozen=True)
class LlavaSource:
    """LLaVA-format data, one sample per image with every conversation about it packed (`by_image`,
    `image_sample`; a validation source holds one-turn conversations, each turn alone); images are opened
    only when a row is made, and one that cannot be read (gone since listing, not an image, truncated)
    becomes None."""

    images: tuple[ImageConversations, ...]
    batch_size: int
    seed: int

    def __len__(self) -> int:
        return len(self.images)

    @property
    def segments(self) -> int:
        """The most segments a sample's row packs: the most conversations about one image."""
        return max((len(group) for group in self.images), default=1)

    def indices(self, positions: np.ndarray) -> np.ndarray:
        return drawn(positions, self.batch_size, self.seed, len(self))

    def samples(self, indices: np.ndarray, image_size: int, images: bool = True) -> list[VQASample | None]:
        """The samples at `indices`, each image decoded (None when it cannot be); images=False leaves
        every file unopened and the image black, for rows whose features and readability come from a
        feature cache."""
        if not images:
            black = Image.new("RGB", (image_size, image_size))
            return [image_sample(self.images[i], black) for i in map(int, indices)]
        return [read_image(self.images[i]) for i in map(int, indices)]

    def images_key(self) -> dict[str, Any]:
        """What fixes the images, index by index (a feature cache's key): each sample's image path."""
        paths = "\n".join(str(image_path(group)) for group in self.images)
        return {"llava": {"images": len(self), "images_sha256": hashlib.sha256(paths.encode()).hexdigest()}}


def read_image(group: ImageConversations) -> VQASample | None:
    """The conversations with their image, or None when the image file cannot be decoded."""
    path = image_path(group)
    try:
        rgb = open_rgb(path)  # loads every pixel: a truncated file fails here, not later
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for missing, unknown and broken files
        logger.warning("skipping %s: %s", path, e)
        return None
    return image_sample(group, rgb)


Source = ProceduralSource | LlavaSource


class SampleRows:
    """Ray Data's map stage: {"data": (n,) row numbers of one worker's stream} -> the rows as the trainer
    reads them, fixed widths so they stack: position (n,), index (n,) of the sample in its source,
    pixels (n, 3, S, S) uint8, ids (n, max_text), segments (n, K), scored (n, max_text) bool, ok (n,) bool,
    cut (n,) bool: the row's text was longer than max_text and lost its end.

    Only the model's text side is built (on the meta device: no weights), from the start checkpoint's
    config and tokenizer, so tokens and preprocessing are those of `tensorize`.
    """

    def __init__(
        self,
        model_dir: str,
        source: Source,
        plan: StepPlan,
        rank: int,
        start_step: int,
        max_text: int,
        features: str | None = None,
    ) -> None:
        import json

        from htcvlm.checkpoint import CONFIG_FILE

        config = HTCConfig.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text())["htcvlm"])
        with torch.device("meta"):
            self.text_model = new_model(config, load_tokenizer(model_dir))
        self.source, self.plan, self.rank, self.start_step = source, plan, rank, start_step
        self.max_text = max_text
        self.n_segments = source.segments
        self.features = FeatureCache(features) if features is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        positions = self.plan.positions(self.rank, self.start_step, batch["data"].astype(np.int64))
        indices = self.source.indices(positions)
        config = self.text_model.config
        cached = self.features.read(indices) if self.features is not None else {}
        readable = cached.pop("readable", None)
        # with cached features the worker never reads the pixels: a procedural scene is left unrendered,
        # and a LLaVA image undecoded when the cache says which could be read (a cache from before it
        # did: decoding is what finds an unreadable one)
        decode = self.features is None or (readable is None and isinstance(self.source, LlavaSource))
        samples = self.source.samples(indices, config.image_size, images=decode)
        if readable is not None:
            samples = [s if r else None for s, r in zip(samples, readable > 0, strict=True)]
        ok = np.array([s is not None for s in samples])
        blank = blank_sample(config.image_size)
        pool = tensorize(self.text_model, [s if s is not None else blank for s in samples])
        n, width, k = len(samples), min(pool.ids.shape[1], self.max_text), pool.segments.shape[1]
        ids = np.full((n, self.max_text), self.text_model.tokenizer.pad_token_id, dtype=np.int64)
        scored = np.zeros((n, self.max_text), dtype=bool)
        segments = np.zeros((n, self.n_segments), dtype=np.int64)
        ids[:, :width] = pool.ids[:, :width].numpy()
        scored[:, :width] = pool.scored[:, :width].numpy() & ok[:, None]  # a bad image scores nothing
        # a row longer than max_text keeps its first segments whole and the cut one's head
        ends = np.minimum(pool.segments.cumsum(dim=1).numpy(), self.max_text)
        segments[:, :k] = np.diff(ends, prepend=0, axis=1)
        return {
            "position": positions,
            "index": indices,
            "pixels": pool.pixels.numpy(),
            "ids": ids,
            "segments": segments,
            "scored": scored,
            "ok": ok,
            "cut": pool.segments.sum(dim=1).numpy() > self.max_text,
            **cached,  # the frozen parts' outputs, when cached: the worker does not run them
        }


def rows_to_batch(rows: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch of `SampleRows` rows -> the model's inputs (cut to the longest row) and `scored`."""
    segments = torch.from_numpy(rows["segments"])
    width = max(int(segments.sum(dim=1).max()), 1)
    return {
        "pixels": (torch.from_numpy(rows["pixels"]).float() / 255.0).to(device),
        "input_ids": torch.from_numpy(rows["ids"][:, :width]).to(device),
        "text_lengths": segments.to(device),
        "scored": torch.from_numpy(rows["scored"][:, :width]).to(device),
        **{key: torch.from_numpy(rows[key]).to(device) for key in ("quantized", "patches") if key in rows},
    }
