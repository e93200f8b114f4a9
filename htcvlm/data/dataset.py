"""The procedural VQA dataset: sample i of a split is a pure function of (split, seed, i).

Each index gets its own `random.Random`, seeded from a SHA-256 of (split, seed, index) — never Python's
salted `hash()` — so any sample can be drawn alone, in any order, in any worker process, and comes out the
same on every machine. The three splits hash different names, so they draw different scenes.

`ProceduralVQA` is map-style (`__len__`/`__getitem__`): a `torch.utils.data.DataLoader` takes it as it is,
with a collate function of the trainer's, which also owns tokenization and image tensors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from htcvlm.data.questions import KIND_OF, QTYPES, Kind, QType, Question, ask
from htcvlm.data.scenes import MAX_OBJECTS, Scene, render, sample_scene

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
# Below this many samples, starting worker processes costs more than rendering in this one.
PARALLEL_MIN = 4096
# A scene fits a given qtype often (relation, the rarest, in about half of the draws); this bound is only
# reached by weights that ask for something no scene has.
MAX_DRAWS = 1000
# Draws per further question about one scene before giving up on it (a one-object scene admits few).
MORE_DRAWS = 20


@dataclass(frozen=True, eq=False)
class VQASample:
    """One image with a question and its answer; what both the procedural set and the LLaVA reader give.

    kind and qtype say what the question probes; LLaVA data carry no such labels (kind None, qtype "llava").
    scene is the procedural scene the image was rendered from, None for real images.
    """

    image: Image.Image  # RGB
    question: str
    answer: str
    kind: Kind | None
    qtype: str
    scene: Scene | None = None
    # further conversations about the same image, each (question, answer) turns in order: a trainer packs
    # them into one pass after the question's, each read as if asked alone (the procedural set's further
    # questions, one turn each; LLaVA entries that share the image)
    more: tuple[tuple[tuple[str, str], ...], ...] = ()
    # the later turns of the question's conversation (LLaVA), each asked after the answers before it:
    # a trainer packs them after the first answer, every turn reading the turns before it
    follow_ups: tuple[tuple[str, str], ...] = ()


def sample_seed(split: Split, index: int, seed: int = 0) -> int:
    """The 64-bit seed of one sample, from a stable hash of its split, the dataset seed and its index."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    digest = hashlib.sha256(f"onetoken-vqa/{split}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _weight_list(weights: Mapping[str, float] | None) -> list[float]:
    """Per-QTYPES weights; qtypes left out of a given mapping get weight 0."""
    if weights is None:
        return [1.0] * len(QTYPES)
    unknown = set(weights) - set(QTYPES)
    if unknown:
        raise ValueError(f"unknown qtypes {sorted(unknown)} in weights; allowed: {QTYPES}")
    values = [float(weights.get(q, 0.0)) for q in QTYPES]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {dict(weights)}")
    return values


def draw_question(
    split: Split,
    index: int,
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
) -> tuple[Scene, Question]:
    """The scene and question of sample `index`, without rendering (cheap: for statistics and tests).

    The qtype is drawn first, by weight, then scenes until one admits a question of that type, so the
    qtype mix follows the weights exactly in expectation.
    """
    scene, questions = draw_questions(split, index, 1, weights, seed, max_objects)
    return scene, questions[0]


def draw_questions(
    split: Split,
    index: int,
    n: int,
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
) -> tuple[Scene, list[Question]]:
    """Sample `index`'s scene with up to `n` distinct questions about it. The first is draw_question's (the
    scene and it do not depend on n); the others are drawn after it from the same generator, qtype by
    weight, so a scene that admits fewer distinct questions (one object, no relations) gives fewer.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(sample_seed(split, index, seed))
    weight_list = _weight_list(weights)
    qtype: QType = rng.choices(QTYPES, weights=weight_list)[0]
    for _ in range(MAX_DRAWS):
        scene = sample_scene(rng, rng.randint(1, max_objects))
        question = ask(scene, qtype, rng)
        if question is not None:
            break
    else:
        raise RuntimeError(f"no scene admitted a {qtype!r} question in {MAX_DRAWS} draws (sample {index})")
    questions = [question]
    for _ in range(MORE_DRAWS * (n - 1)):
        if len(questions) == n:
            break
        more = ask(scene, rng.choices(QTYPES, weights=weight_list)[0], rng)
        if more is not None and all(more.text != q.text for q in questions):
            questions.append(more)
    return scene, questions


class ProceduralVQA:
    """`size` samples of one split, rendered at image_size px on access (nothing is stored).

    weights: relative frequency per qtype (default: all equal); qtypes left out are never asked.
    seed: shifts the whole dataset; the default 0 is the canonical train/val/test.
    max_objects: at most this many objects per scene (fewer make an easier curriculum set).
    questions: up to this many distinct questions per image, the first as `questions=1` gives it and the
        others in `VQASample.more` (for training several questions per compressed image).
    """

    def __init__(
        self,
        split: Split,
        size: int,
        image_size: int = 64,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        max_objects: int = MAX_OBJECTS,
        questions: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        _weight_list(weights)  # fail here, not at the first __getitem__
        self.split = split
        self.size = size
        self.image_size = image_size
        self.weights = dict(weights) if weights is not None else None
        self.seed = seed
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
        self.max_objects = max_objects
        if questions < 1:
            raise ValueError(f"questions must be >= 1, got {questions}")
        self.questions = questions

    def __len__(self) -> int:
        return self.size

    def draw(self, index: int) -> tuple[Scene, Question]:
        """Sample index's scene and question without the image."""
        scene, questions = self._draw(index, 1)
        return scene, questions[0]

    def _draw(self, index: int, n: int) -> tuple[Scene, list[Question]]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return draw_questions(self.split, index, n, self.weights, self.seed, self.max_objects)

    def __getitem__(self, index: int) -> VQASample:
        return self.sample(index)

    def sample(self, index: int, image: bool = True) -> VQASample:
        """Sample index; with image=False a black image stands in for the scene's, for a reader that takes
        the image's features from elsewhere (a feature cache): the questions without rendering's cost."""
        scene, (question, *more) = self._draw(index, self.questions)
        size = self.image_size
        return VQASample(
            image=render(scene, size) if image else Image.new("RGB", (size, size)),
            question=question.text,
            answer=question.answer,
            kind=KIND_OF[question.qtype],
            qtype=question.qtype,
            scene=scene,
            more=tuple(((q.text, q.answer),) for q in more),
        )

    def render_all(self, workers: int | None = None) -> list[VQASample]:
        """Every sample, rendered by `workers` processes (default: one per CPU, at most 16).

        Each sample is a pure function of its index, so the result is the same for any worker count.
        """
        workers = min(os.cpu_count() or 1, 16) if workers is None else workers
        if workers <= 1 or self.size < PARALLEL_MIN:
            return _render_range(self, 0, self.size)
        step = math.ceil(self.size / (4 * workers))  # a few chunks per worker evens out their speed
        starts = range(0, self.size, step)
        # spawn, not fork: the caller may hold torch's thread pools, which a forked child inherits broken
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            chunks = pool.map(
                _render_range, [self] * len(starts), starts, [min(i + step, self.size) for i in starts]
            )
            return [sample for chunk in chunks for sample in chunk]


def _render_range(data: ProceduralVQA, start: int, stop: int) -> list[VQASample]:
    return [data[i] for i in range(start, stop)]
