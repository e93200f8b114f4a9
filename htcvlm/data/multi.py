"""Questions over several images at once, each with exactly one correct answer.

A question is about k images in order, "image 1" … "image k" (the order of the records in the context):

- count: "how many of the images show a red object?" / "… show a circle?" -> "zero" … "sixteen"
- find: "which image shows a red circle?" -> "image 3"; exactly one of the k images has such an object
- compare: "do image 2 and image 5 show the same number of objects?" -> "yes" / "no"

Each is answered from what the single-image questions already teach (colors, shapes, counts), read from
every record in view, so it measures whether one-token records keep those facts apart when many share a
context. Images come from a pool of scenes described by `ImageFacts` (from a `Scene`, or from a pool's
per-cell labels), and the images of a question are drawn so that its answer is uniform over its range:
a count c is drawn first from 0 … k, then c images that show the thing and k - c that do not; a find
puts its one image at a uniform place; a compare is "yes" half the time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from htcvlm.data.questions import COUNT_WORDS
from htcvlm.data.scenes import COLORS, SHAPES, Scene

if TYPE_CHECKING:
    import torch

MultiQType = Literal["count", "find", "compare"]
MULTI_QTYPES: tuple[MultiQType, ...] = ("count", "find", "compare")
# answers of counts over up to 16 images (training draws k <= 8; 16 tests beyond it)
MULTI_COUNT_WORDS: tuple[str, ...] = (
    *COUNT_WORDS,
    *("five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    *("thirteen", "fourteen", "fifteen", "sixteen"),
)
MAX_QUESTION_IMAGES = len(MULTI_COUNT_WORDS) - 1
# draws of a random pool image before giving up on finding one with (or without) a property
MAX_DRAWS = 1000


@dataclass(frozen=True)
class ImageFacts:
    """What multi-image questions ask about one image: its objects as (shape, color), and their number."""

    objects: frozenset[tuple[str, str]]

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    def shows(self, shape: str | None = None, color: str | None = None) -> bool:
        """Whether some object has this shape and/or this color."""
        return any((shape in (None, s)) and (color in (None, c)) for s, c in self.objects)


def facts_of_scene(scene: Scene) -> ImageFacts:
    return ImageFacts(frozenset((o.shape, o.color) for o in scene.objects))


def facts_of_cells(cells: torch.Tensor) -> list[ImageFacts]:
    """(N, 9, 4) per-cell labels (`htcvlm.pool.cell_labels`: shape 0 = empty, then color) -> facts."""
    colors = list(COLORS)
    return [
        ImageFacts(frozenset((SHAPES[int(c[0]) - 1], colors[int(c[1])]) for c in row.tolist() if c[0] > 0))
        for row in cells
    ]


@dataclass(frozen=True)
class MultiQuestion:
    images: tuple[int, ...]  # pool indices, in the order the question numbers them (image 1 first)
    text: str
    answer: str
    qtype: MultiQType


def ordinal(i: int) -> str:
    """The name of the image at 0-based place i."""
    return f"image {i + 1}"


class NoSuchImage(LookupError):
    """No image of the pool (not yet in the question) has, or lacks, the property a question needs."""


def _draw_where(facts: Sequence[ImageFacts], want: bool, test, rng: random.Random, avoid: set[int]) -> int:
    """A random pool index whose facts pass `test` (or fail it, want=False), not in `avoid`: random draws
    first, then every image in a random order, so a rare property is found if any image has it."""
    for _ in range(MAX_DRAWS):
        i = rng.randrange(len(facts))
        if i not in avoid and bool(test(facts[i])) == want:
            return i
    for i in rng.sample(range(len(facts)), len(facts)):
        if i not in avoid and bool(test(facts[i])) == want:
            return i
    raise NoSuchImage(f"no pool image {'with' if want else 'without'} the property")


def _count(facts: Sequence[ImageFacts], k: int, rng: random.Random) -> MultiQuestion:
    if rng.random() < 0.5:
        color = rng.choice(list(COLORS))
        text, test = f"how many of the images show a {color} object?", lambda f: f.shows(color=color)
    else:
        shape = rng.choice(SHAPES)
        text, test = f"how many of the images show a {shape}?", lambda f: f.shows(shape=shape)
    c = rng.randint(0, k)
    chosen: set[int] = set()
    picks = []
    for want in [True] * c + [False] * (k - c):
        picks.append(_draw_where(facts, want, test, rng, chosen))
        chosen.add(picks[-1])
    rng.shuffle(picks)
    return MultiQuestion(tuple(picks), text, MULTI_COUNT_WORDS[c], "count")


def _find(facts: Sequence[ImageFacts], k: int, rng: random.Random) -> MultiQuestion:
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))

    def test(f: ImageFacts) -> bool:
        return f.shows(shape, color)

    at = rng.randrange(k)
    chosen: set[int] = set()
    picks = []
    for i in range(k):
        picks.append(_draw_where(facts, i == at, test, rng, chosen))
        chosen.add(picks[-1])
    return MultiQuestion(tuple(picks), f"which image shows a {color} {shape}?", ordinal(at), "find")


def _compare(facts: Sequence[ImageFacts], k: int, rng: random.Random) -> MultiQuestion:
    a, b = sorted(rng.sample(range(k), 2))
    same = rng.random() < 0.5
    chosen: set[int] = set()
    picks = []
    for _ in range(k):
        picks.append(_draw_where(facts, True, lambda f: True, rng, chosen))
        chosen.add(picks[-1])
    n = facts[picks[a]].n_objects
    chosen.discard(picks[b])
    picks[b] = _draw_where(facts, same, lambda f: f.n_objects == n, rng, chosen)
    text = f"do {ordinal(a)} and {ordinal(b)} show the same number of objects?"
    return MultiQuestion(tuple(picks), text, "yes" if same else "no", "compare")


_ASK = {"count": _count, "find": _find, "compare": _compare}


def multi_question(
    facts: Sequence[ImageFacts], k: int, qtype: MultiQType, rng: random.Random
) -> MultiQuestion:
    """A question of `qtype` over k distinct images of the pool `facts`."""
    if qtype not in _ASK:
        raise ValueError(f"qtype must be one of {MULTI_QTYPES}, got {qtype!r}")
    lowest = 2 if qtype == "compare" else 1
    if not lowest <= k <= min(MAX_QUESTION_IMAGES, len(facts)):
        raise ValueError(f"a {qtype} question takes {lowest} to {MAX_QUESTION_IMAGES} images, got k={k}")
    return _ASK[qtype](facts, k, rng)


def multi_questions(
    facts: Sequence[ImageFacts],
    ks: Sequence[int],
    n: int,
    rng: random.Random,
    tries: int = 1,
    kinds: Sequence[MultiQType] = MULTI_QTYPES,
) -> list[MultiQuestion]:
    """n questions, each of a k drawn uniformly from `ks` and a qtype uniform among the `kinds` that k
    allows (compare needs k >= 2; a kind listed twice is drawn twice as often). `tries` > 1: a question
    the pool cannot answer (`NoSuchImage`: a small pool may lack a "red circle") is drawn again, with
    the same k and qtype, up to that many times in all."""
    if set(kinds) == {"compare"}:
        ks = [k for k in ks if k >= 2]
    if not ks or not set(kinds) <= set(MULTI_QTYPES):
        raise ValueError(f"no question of kinds {tuple(kinds)} over {tuple(ks)} images")
    out = []
    for _ in range(n):
        k = rng.choice(list(ks))
        qtypes = [q for q in kinds if k >= 2 or q != "compare"]
        qtype = rng.choice(qtypes)
        for attempt in range(tries):
            try:
                out.append(multi_question(facts, k, qtype, rng))
                break
            except NoSuchImage:
                if attempt == tries - 1:
                    raise
    return out
