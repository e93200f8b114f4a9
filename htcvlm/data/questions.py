"""Closed-set questions about a scene, with exactly one correct answer each.

Two kinds, as in the paper's probing (section 5.3): *semantic* questions ask what the objects are and how
they stand (shape, count, relation), *detail* questions ask how they look (color, texture, size, position).
Semantic questions name an object by its color and detail questions by its shape, so neither kind can be
answered from the question alone. A question is only asked when its answer is unique: "what color is the
circle?" needs exactly one circle, "what shape is left of the red object?" exactly one object in a column
left of the red one. `ask()` returns None when the scene admits no such question of the asked type.

Answers are single words; `answer_vocabulary()` lists them all and `question_templates()` the question
forms, so a tokenizer can be built over the closed set before any data is drawn.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from htcvlm.data.scenes import COLORS, POSITIONS, SHAPES, SIZES, TEXTURES, Scene, SceneObject

logger = logging.getLogger(__name__)

Kind = Literal["semantic", "detail"]
QType = Literal["shape", "count", "relation", "color", "texture", "size", "position"]

QTYPES: tuple[QType, ...] = ("shape", "count", "relation", "color", "texture", "size", "position")
KIND_OF: dict[QType, Kind] = {
    "shape": "semantic",
    "count": "semantic",
    "relation": "semantic",
    "color": "detail",
    "texture": "detail",
    "size": "detail",
    "position": "detail",
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
PLURAL: dict[str, str] = {shape: f"{shape}s" for shape in SHAPES}

TEMPLATES: dict[QType, tuple[str, ...]] = {
    "shape": ("what shape is the {color} object?",),
    "count": ("how many objects are there?", "how many {shapes} are there?"),
    "relation": ("what shape is {relation} the {color} object?",),
    "color": ("what color is the {shape}?",),
    "texture": ("what texture does the {shape} have?",),
    "size": ("what size is the {shape}?",),
    "position": ("where is the {shape}?",),
}
# the values each template slot takes, for building a tokenizer over every question
SLOTS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "shapes": tuple(PLURAL.values()),
    "relation": RELATIONS,
}


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: Kind
    qtype: QType


def answers_for(qtype: QType) -> tuple[str, ...]:
    """Every answer a question of this type can have."""
    if qtype in ("shape", "relation"):
        return SHAPES
    if qtype == "count":
        return COUNT_WORDS
    if qtype == "color":
        return tuple(COLORS)
    if qtype == "texture":
        return TEXTURES
    if qtype == "size":
        return SIZES
    if qtype == "position":
        return POSITIONS
    raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")


def answer_vocabulary() -> tuple[str, ...]:
    """All possible answers, each once, in a fixed order (by qtype, then as listed there)."""
    return tuple(dict.fromkeys(a for qtype in QTYPES for a in answers_for(qtype)))


def question_templates() -> dict[QType, tuple[str, ...]]:
    """The question forms per qtype; slots in braces take the values listed in SLOTS."""
    return dict(TEMPLATES)


def in_relation(obj: SceneObject, ref: SceneObject, relation: str) -> bool:
    """Whether obj is `relation` ref, by grid column (left/right) or row (above/below)."""
    if relation == "left of":
        return obj.col < ref.col
    if relation == "right of":
        return obj.col > ref.col
    if relation == "above":
        return obj.row < ref.row
    if relation == "below":
        return obj.row > ref.row
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _unique_shapes(scene: Scene) -> list[SceneObject]:
    """Objects whose shape no other object in the scene has, so "the {shape}" names exactly one."""
    return [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]


def _ask_shape(scene: Scene, rng: random.Random) -> Question | None:
    obj = rng.choice(scene.objects)  # colors are distinct within a scene, so any object is nameable
    return Question(f"what shape is the {obj.color} object?", obj.shape, "semantic", "shape")


def _ask_count(scene: Scene, rng: random.Random) -> Question | None:
    if rng.random() < 0.5:
        return Question("how many objects are there?", COUNT_WORDS[len(scene.objects)], "semantic", "count")
    shape = rng.choice(SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    return Question(f"how many {PLURAL[shape]} are there?", COUNT_WORDS[n], "semantic", "count")


def _ask_relation(scene: Scene, rng: random.Random) -> Question | None:
    choices = []
    for ref in scene.objects:
        for relation in RELATIONS:
            hits = [o for o in scene.objects if in_relation(o, ref, relation)]
            if len(hits) == 1:
                choices.append((ref, relation, hits[0]))
    if not choices:
        return None
    ref, relation, hit = rng.choice(choices)
    return Question(f"what shape is {relation} the {ref.color} object?", hit.shape, "semantic", "relation")


def _ask_color(scene: Scene, rng: random.Random) -> Question | None:
    objs = _unique_shapes(scene)
    if not objs:
        return None
    obj = rng.choice(objs)
    return Question(f"what color is the {obj.shape}?", obj.color, "detail", "color")


def _ask_texture(scene: Scene, rng: random.Random) -> Question | None:
    # only large objects carry textures (see scenes.py); asking about small ones would make "plain" the
    # answer two times in three and let a model answer from size alone
    objs = [o for o in _unique_shapes(scene) if o.size == "large"]
    if not objs:
        return None
    obj = rng.choice(objs)
    return Question(f"what texture does the {obj.shape} have?", obj.texture, "detail", "texture")


def _ask_size(scene: Scene, rng: random.Random) -> Question | None:
    objs = _unique_shapes(scene)
    if not objs:
        return None
    obj = rng.choice(objs)
    return Question(f"what size is the {obj.shape}?", obj.size, "detail", "size")


def _ask_position(scene: Scene, rng: random.Random) -> Question | None:
    objs = _unique_shapes(scene)
    if not objs:
        return None
    obj = rng.choice(objs)
    return Question(f"where is the {obj.shape}?", obj.position, "detail", "position")


_ASK: dict[QType, Callable[[Scene, random.Random], Question | None]] = {
    "shape": _ask_shape,
    "count": _ask_count,
    "relation": _ask_relation,
    "color": _ask_color,
    "texture": _ask_texture,
    "size": _ask_size,
    "position": _ask_position,
}


def ask(scene: Scene, qtype: QType, rng: random.Random) -> Question | None:
    """A question of type qtype about the scene with exactly one correct answer; None if none exists."""
    if qtype not in _ASK:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    return _ASK[qtype](scene, rng)
