"""Multi-image questions and the training pass over them: the questions are right by construction, and
training's logits are decoding's, so what the model learns is what the service asks."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from htcvlm.config import LayoutConfig
from htcvlm.data.dataset import draw_question
from htcvlm.data.multi import (
    MULTI_COUNT_WORDS,
    MultiQuestion,
    facts_of_cells,
    facts_of_scene,
    multi_question,
    multi_questions,
    ordinal,
)
from htcvlm.data.scenes import render
from htcvlm.decode import DecodeBatch
from htcvlm.placement import row_text
from htcvlm.pool import VQATensors, cell_labels
from htcvlm.train.contrastive import contrastive_loss, info_nce
from htcvlm.train.multi import multi_image_logits, tokenize_rows, voco_states
from htcvlm.train.run import model_config
from htcvlm.train.stages import answer_loss

from .helpers import LLAVA, VOCO_LLAMA, make_model, sharpened
from .test_multi_image import reference_logits

N_POOL = 2000


@pytest.fixture(scope="module")
def facts():
    scenes = [draw_question("train", i)[0] for i in range(N_POOL)]
    return [facts_of_scene(s) for s in scenes], scenes


def recount(facts, q: MultiQuestion) -> str:
    """The answer computed from the question's text and its images' facts, independently of how it was
    drawn."""
    shown = [facts[i] for i in q.images]
    words = q.text.rstrip("?").split()
    if q.qtype == "count":
        thing = words[-2] if words[-1] == "object" else words[-1]
        by_color = words[-1] == "object"
        n = sum(f.shows(color=thing) if by_color else f.shows(shape=thing) for f in shown)
        return MULTI_COUNT_WORDS[n]
    if q.qtype == "find":
        color, shape = words[-2], words[-1]
        hits = [i for i, f in enumerate(shown) if f.shows(shape, color)]
        assert len(hits) == 1, (q, hits)
        return ordinal(hits[0])
    a, b = int(words[2]) - 1, int(words[5]) - 1
    return "yes" if shown[a].n_objects == shown[b].n_objects else "no"


@pytest.mark.parametrize("k", [1, 2, 5, 8, 16])
def test_every_multi_question_has_the_answer_its_images_give(facts, k):
    facts, _ = facts
    rng = random.Random(k)
    for qtype in ("count", "find", "compare") if k >= 2 else ("count", "find"):
        for _ in range(60):
            q = multi_question(facts, k, qtype, rng)
            assert len(q.images) == k == len(set(q.images))
            assert recount(facts, q) == q.answer, q


def test_answers_are_balanced_and_the_draw_is_reproducible(facts):
    facts, _ = facts
    qs = multi_questions(facts, [4], 1200, random.Random(3))
    assert qs == multi_questions(facts, [4], 1200, random.Random(3))
    by_type = Counter(q.qtype for q in qs)
    assert min(by_type.values()) > 300
    counts = Counter(q.answer for q in qs if q.qtype == "count")
    assert set(counts) == set(MULTI_COUNT_WORDS[:5]) and min(counts.values()) > 40  # uniform over 0 … 4
    places = Counter(q.answer for q in qs if q.qtype == "find")
    assert set(places) == {ordinal(i) for i in range(4)} and min(places.values()) > 60
    yes = sum(q.answer == "yes" for q in qs if q.qtype == "compare") / by_type["compare"]
    assert 0.4 < yes < 0.6


def test_facts_from_cell_labels_are_the_scenes_facts(facts):
    facts, scenes = facts
    assert facts_of_cells(cell_labels(scenes[:300])) == facts[:300]


def test_a_question_needs_images_it_can_name(facts):
    facts, _ = facts
    with pytest.raises(ValueError, match="compare question takes 2"):
        multi_question(facts, 1, "compare", random.Random(0))
    with pytest.raises(ValueError, match="takes 1 to 16 images"):
        multi_question(facts, 17, "count", random.Random(0))


LAYOUTS = {
    "tiny": dict(),
    "llava": dict(layout=LLAVA),
    "tiny-marked": dict(layout=LayoutConfig(image_marker=" (image {i})")),
    "voco-llama": dict(layout=VOCO_LLAMA, channels="continuous", visual_attention="causal", n_voco=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_logits_are_decodings_for_every_row(tokenizer, layout):
    """Rows of 1, 2, 5 and 8 images in one batch, one image in two rows: the training pass (with
    gradients, S computed in the same pass) gives the logits of the full block-masked pass that
    test_multi_image.py writes from the rule alone, and decode's prompt logits from compressed records."""
    model = sharpened(make_model(tokenizer, seed=5, **LAYOUTS[layout]))
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8, generator=gen)
    pool = VQATensors(
        pixels=pixels,
        ids=torch.zeros(12, 1, dtype=torch.long),
        segments=torch.ones(12, 1, dtype=torch.long),
        scored=torch.zeros(12, 1, dtype=torch.bool),
        qtypes=[""] * 12,
        answers=[""] * 12,
        questions=[""] * 12,
    )
    questions = [
        MultiQuestion((3,), "what shape is the object on the left?", "circle", "count"),
        MultiQuestion((7, 3), "color?", "red", "count"),
        MultiQuestion((0, 11, 4, 9, 2), "how many striped objects are in this picture?", "two", "count"),
        MultiQuestion((1, 2, 5, 6, 8, 10, 4, 0), "color?", "image 8", "find"),
    ]
    rows = tokenize_rows(model, questions)
    ids, logits, scored = multi_image_logits(model, pool, rows)
    assert scored.sum() == sum(rows.answer_lengths)
    loss = answer_loss(logits, ids, scored)
    loss.backward()
    assert model.voco.grad is not None and model.voco.grad.abs().sum() > 0

    with torch.inference_mode():
        records = model.compress_pixels(pixels.float() / 255, [f"{i:064x}" for i in range(12)])
        served = DecodeBatch(model, [[records[i] for i in q.images] for q in questions], rows.texts)
    for row, q in enumerate(questions):
        n = len(row_text(model.layout, len(q.images), rows.texts[row])[0])  # markers, prompt, answer
        trained = logits[row, -n:].detach()
        torch.testing.assert_close(trained, served.row_prompt_logits(row), atol=1e-4, rtol=0)
        full = reference_logits(model, pixels.float() / 255, list(q.images), rows.texts[row])
        torch.testing.assert_close(trained, full, atol=1e-4, rtol=0)


def test_training_latents_are_the_records_latents(tokenizer):
    """The latent the contrastive loss trains is the one Search ranks by: compress()'s."""
    model = make_model(tokenizer, seed=3, layout=LLAVA)
    pixels = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    *_, latents = voco_states(model, pixels)
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(6)])
    torch.testing.assert_close(latents.detach(), torch.stack([r.latent for r in records]), atol=1e-5, rtol=0)


def test_info_nce_is_low_only_for_matching_views():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen)
    assert info_nce(a, a + 0.01 * torch.randn(16, 32, generator=gen)) < 0.05
    assert info_nce(a, a[torch.randperm(16, generator=gen)]) > 2.0


def test_the_contrastive_loss_pulls_views_of_one_image_together(tokenizer):
    """A few optimizer steps on the loss alone lower it on fresh views of the same images: the latent
    learns the augmentations, through the whole compression pass (tower and MGVQ frozen)."""
    model = make_model(tokenizer, seed=8).train()
    scenes = [draw_question("train", i)[0] for i in range(24)]
    pixels = torch.stack(
        [torch.from_numpy(np.array(render(s, 64))).permute(2, 0, 1) for s in scenes]
    )  # (N, 3, 64, 64) uint8
    pool = VQATensors(pixels, *[None] * 3, *[[""] * 24] * 3)  # only pixels are read
    trained = [p for name, p in model.named_parameters() if not name.startswith(("mgvq", "vision"))]
    opt = torch.optim.AdamW(trained, 3e-3)

    def held_out() -> float:
        with torch.no_grad():
            return float(contrastive_loss(model, pool, 24, random.Random(99)))

    before = held_out()
    for step in range(25):
        loss = contrastive_loss(model, pool, 16, random.Random(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < 0.7 * before, (before, held_out())


def test_a_run_puts_its_image_marker_into_the_layout():
    config = model_config("tiny", "hybrid", {"image_marker": " (image {i})", "n_discrete": 2})
    assert config.layout.image_marker == " (image {i})" and config.n_discrete == 2
    assert "image_marker" not in model_config("tiny", "hybrid", {}).to_dict().get("layout", {})
    with pytest.raises(ValueError, match="exactly once"):
        LayoutConfig(image_marker="(image)")
