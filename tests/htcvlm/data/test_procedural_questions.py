"""Questions: one correct answer each, recomputed here from the scene by an independent reading."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from htcvlm.data.dataset import SPLITS, draw_question
from htcvlm.data.questions import (
    KIND_OF,
    QTYPES,
    SLOTS,
    answer_vocabulary,
    answers_for,
    ask,
    question_templates,
)
from htcvlm.data.scenes import POSITIONS, Background, Scene, SceneObject

COUNT = ("zero", "one", "two", "three", "four")


def the(scene: Scene, **attrs: str) -> SceneObject:
    """The one object with these attributes; fails the test if the reference is ambiguous or empty."""
    matches = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(matches) == 1, f"'the' object with {attrs} names {len(matches)} objects in {scene}"
    return matches[0]


def solve(scene: Scene, question: str) -> str:
    """The answer as a reader of the scene would give it, from the question text alone."""
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return the(scene, color=m[1]).shape
    if question == "how many objects are there?":
        return COUNT[len(scene.objects)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return COUNT[sum(o.shape == m[1] for o in scene.objects)]
    if m := re.fullmatch(r"what shape is (left of|right of|above|below) the (\w+) object\?", question):
        ref = the(scene, color=m[2])
        axis = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}[m[1]]

        def grid(o: SceneObject) -> tuple[int, int]:
            return divmod(o.cell, 3)  # (row, col)

        hits = [o for o in scene.objects if (grid(o)[axis[0]] - grid(ref)[axis[0]]) * axis[1] > 0]
        assert len(hits) == 1, f"{question!r} has {len(hits)} candidates in {scene}"
        return hits[0].shape
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return the(scene, shape=m[1]).color
    if m := re.fullmatch(r"what texture does the (\w+) have\?", question):
        return the(scene, shape=m[1]).texture
    if m := re.fullmatch(r"what size is the (\w+)\?", question):
        return the(scene, shape=m[1]).size
    if m := re.fullmatch(r"where is the (\w+)\?", question):
        return POSITIONS[the(scene, shape=m[1]).cell]
    raise AssertionError(f"unparsed question {question!r}")


def template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for slot, values in SLOTS.items():
        pattern = pattern.replace(re.escape("{" + slot + "}"), "(" + "|".join(map(re.escape, values)) + ")")
    return re.compile(pattern)


@pytest.fixture(scope="module")
def drawn() -> list:
    return [draw_question(split, i) for split in SPLITS for i in range(700)]


def test_every_answer_matches_the_scene(drawn: list) -> None:
    for scene, question in drawn:
        assert solve(scene, question.text) == question.answer, (question, scene)
        assert question.kind == KIND_OF[question.qtype]


def test_answer_vocabulary_is_exactly_the_answers_given(drawn: list) -> None:
    vocabulary = answer_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) == 29
    given = {q.answer for _, q in drawn}
    assert given <= set(vocabulary), given - set(vocabulary)
    assert set(vocabulary) <= given, f"never drawn in {len(drawn)} samples: {set(vocabulary) - given}"
    for _, q in drawn:
        assert q.answer in answers_for(q.qtype)
    assert all(" " not in a for a in vocabulary)  # single words, one class each


def test_every_question_fits_one_template_of_its_qtype(drawn: list) -> None:
    templates = question_templates()
    assert set(templates) == set(QTYPES)
    regexes = {qtype: [template_regex(t) for t in forms] for qtype, forms in templates.items()}
    used = Counter()
    for _, q in drawn:
        fits = [i for i, r in enumerate(regexes[q.qtype]) if r.fullmatch(q.text)]
        assert len(fits) == 1, q
        used[q.qtype, fits[0]] += 1
    assert len(used) == sum(len(forms) for forms in templates.values())  # every template in use


def test_answers_are_spread_within_each_qtype(drawn: list) -> None:
    # a model must look at the image: no answer may dominate its qtype
    by_qtype: dict[str, Counter] = {}
    for _, q in drawn:
        by_qtype.setdefault(q.qtype, Counter())[q.answer] += 1
    for qtype, counts in by_qtype.items():
        top = counts.most_common(1)[0][1] / sum(counts.values())
        assert top < min(0.6, 2 / len(answers_for(qtype))), (qtype, counts)


def scene_of(*objects: tuple[str, str, str, int]) -> Scene:
    background = Background("solid", ((90, 90, 90), (90, 90, 90)), True, 0)
    return Scene(
        tuple(
            SceneObject(shape, color, size, "plain", cell, ((cell % 3 + 0.5) / 3, (cell // 3 + 0.5) / 3))
            for shape, color, size, cell in objects
        ),
        background,
    )


def test_ambiguous_questions_are_not_asked() -> None:
    rng = random.Random(0)
    two_circles = scene_of(("circle", "red", "large", 0), ("circle", "blue", "large", 8))
    for qtype in ("color", "texture", "size", "position"):
        assert ask(two_circles, qtype, rng) is None, qtype
    # the red circle has one object right of it and below it, so each direction is well defined
    relation = ask(two_circles, "relation", rng)
    assert relation is not None and relation.answer == "circle"
    lonely = scene_of(("square", "green", "small", 4))
    assert ask(lonely, "relation", rng) is None
    # a row of three: left of the middle one is exactly one object, left of the right one is two
    row = scene_of(
        ("circle", "red", "large", 3), ("square", "blue", "large", 4), ("diamond", "green", "small", 5)
    )
    asked = {ask(row, "relation", random.Random(s)).text for s in range(200)}
    assert "what shape is left of the green object?" not in asked
    assert "what shape is left of the blue object?" in asked


def test_texture_is_only_asked_of_large_objects() -> None:
    small = scene_of(("triangle", "yellow", "small", 2))
    assert ask(small, "texture", random.Random(0)) is None


def test_unknown_qtype_is_refused() -> None:
    with pytest.raises(ValueError, match="'colour'"):
        ask(scene_of(("circle", "red", "large", 0)), "colour", random.Random(0))  # type: ignore[arg-type]
