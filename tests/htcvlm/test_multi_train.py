"""Multi-image questions and the training pass over them: the questions are right by construction, and
training's logits are decoding's, so what the model learns is what the service asks."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from htcvlm.config import ImageProcessing, LayoutConfig
from htcvlm.data.dataset import draw_question
from htcvlm.data.multi import (
    MULTI_COUNT_WORDS,
    ImageFacts,
    MultiQuestion,
    NoSuchImage,
    facts_of_cells,
    facts_of_scene,
    multi_question,
    multi_questions,
    ordinal,
)
from htcvlm.data.scenes import COLORS, SHAPES, render
from htcvlm.decode import DecodeBatch
from htcvlm.evaluate import multi_image_accuracy, predict
from htcvlm.placement import row_text
from htcvlm.pool import VQATensors, cell_labels, procedural_pool
from htcvlm.train import contrastive
from htcvlm.train.contrastive import augmented_view, contrastive_loss, info_nce
from htcvlm.train.multi import (
    draw_rows,
    fits_uncompressed,
    multi_image_logits,
    multi_image_upper_logits,
    tokenize_rows,
    uncompressed_length,
    uncompressed_logits,
    voco_states,
)
from htcvlm.train.recipe import TrainConfig
from htcvlm.train.run import model_config
from htcvlm.train.stages import answer_loss, train_vlm

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


def test_a_run_chooses_the_kinds_it_asks_and_how_often(facts, tokenizer):
    facts, _ = facts
    drawn = Counter(
        q.qtype for q in multi_questions(facts, [3], 900, random.Random(1), kinds=("find", "count", "find"))
    )
    assert set(drawn) == {"find", "count"} and 0.6 < drawn["find"] / 900 < 0.73
    compares = multi_questions(facts, [1, 2, 3], 200, random.Random(2), kinds=("compare",))
    assert {q.qtype for q in compares} == {"compare"} and {len(q.images) for q in compares} == {2, 3}
    model = make_model(tokenizer)
    rows = draw_rows(model, facts, 50, 4, random.Random(5), step_images=32, kinds=("find",))
    assert {q.qtype for q in rows.questions} == {"find"}
    assert TrainConfig(multi_kinds=["find", "find", "count"]).multi_kinds == ("find", "find", "count")
    with pytest.raises(ValueError, match="multi_kinds must be some of"):
        TrainConfig(multi_kinds=("find", "colour"))
    with pytest.raises(ValueError, match="multi_kinds must be some of"):
        TrainConfig(multi_kinds=())


def test_facts_from_cell_labels_are_the_scenes_facts(facts):
    facts, scenes = facts
    assert facts_of_cells(cell_labels(scenes[:300])) == facts[:300]


def test_a_question_needs_images_it_can_name(facts):
    facts, _ = facts
    with pytest.raises(ValueError, match="compare question takes 2"):
        multi_question(facts, 1, "compare", random.Random(0))
    with pytest.raises(ValueError, match="takes 1 to 16 images"):
        multi_question(facts, 17, "count", random.Random(0))


def test_rows_of_a_step_share_its_image_subset_and_keep_their_answers(facts, tokenizer):
    facts, _ = facts
    model = make_model(tokenizer)
    rows = draw_rows(model, facts, 300, 8, random.Random(5), step_images=64)
    used = {i for q in rows.questions for i in q.images}
    assert len(used) <= 64 and len(used) > 32  # one subset, most of it named
    for q in rows.questions:
        assert recount(facts, q) == q.answer, q
    again = draw_rows(model, facts, 300, 8, random.Random(5), step_images=64)
    assert again.questions == rows.questions
    whole = draw_rows(model, facts, 300, 8, random.Random(5))
    assert len({i for q in whole.questions for i in q.images}) > 64


def test_a_rare_property_is_found_and_a_question_the_pool_cannot_answer_is_drawn_again():
    colors = list(COLORS)
    common, rare = (SHAPES[0], colors[0]), (SHAPES[1], colors[1])
    facts = [ImageFacts(frozenset({common}))] * 5000 + [ImageFacts(frozenset({rare}))]
    found = [q for seed in range(300) for q in [_find_or_none(facts, seed)] if q is not None]
    rare_text = f"which image shows a {rare[1]} {rare[0]}?"
    assert {q.text for q in found} == {rare_text, f"which image shows a {common[1]} {common[0]}?"}
    assert all(q.images == (5000,) for q in found if q.text == rare_text)  # the one image of 5,001
    with pytest.raises(NoSuchImage):
        multi_questions(facts, [1], 50, random.Random(0))
    assert len(multi_questions(facts, [1], 50, random.Random(0), tries=100)) == 50


def _find_or_none(facts, seed: int):
    try:
        return multi_question(facts, 1, "find", random.Random(seed))
    except NoSuchImage:
        return None


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


def reference_uncompressed(model, pixels, images: list[int], text: list[int]) -> torch.Tensor:
    """The upper bound's text logits written token by token: S once, then each image's [V_hy; sep;
    voco] and marker, then the text, at consecutive positions; an image token reads S and the tokens of
    its own image before it (an isolated image token only itself there); text reads everything before it."""
    layout, k = model.layout, len(images)
    kinds: list[tuple[str, int]] = [("shared", -1)] * layout.n_shared
    embeds = [model.embed_text(torch.tensor(layout.shared_ids, dtype=torch.long))]
    for b, i in enumerate(images):
        marker = list(layout.marker_ids(b)) if k > 1 else []
        kinds += [("visual", b)] * layout.n_visual + [("image", b)] * (layout.n_separator + layout.n_voco)
        kinds += [("text", -1)] * len(marker)
        embeds += [model.image_embeds(pixels[i : i + 1])[0][0], model.embed_text(torch.tensor(marker).long())]
    kinds += [("text", -1)] * len(text)
    embeds.append(model.embed_text(torch.tensor(text, dtype=torch.long)))
    n = len(kinds)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for a, (kind, block) in enumerate(kinds):
        for b in range(a + 1):
            other, other_block = kinds[b]
            if kind in ("shared", "text"):
                allowed[a, b] = True
            elif other == "shared" or other_block == block:
                isolated = model.config.visual_attention == "isolated"
                allowed[a, b] = not (isolated and kind == other == "visual" and a != b)
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    out = model.llm(
        inputs_embeds=torch.cat(embeds)[None], attention_mask=mask, position_ids=torch.arange(n)[None]
    )
    return out.logits[0, n - len(text) :]


@pytest.mark.parametrize("layout", ["tiny", "llava", "tiny-marked", "voco-llama"])
def test_the_uncompressed_pass_over_several_images(tokenizer, layout):
    """The upper bound's pass: rows of 1, 2 and 4 images in one batch give the logits of the pass
    written token by token, and one image is the single-image upper bound of `HTCVLM.forward`."""
    model = sharpened(make_model(tokenizer, seed=3, **LAYOUTS[layout]))
    gen = torch.Generator().manual_seed(4)
    pixels = torch.rand(6, 3, 64, 64, generator=gen)
    images = [[2], [0, 5], [1, 3, 4, 0]]
    texts = [[*model.prompt_ids("how many objects are there?"), 7, 9], model.prompt_ids("color?"), [5, 6, 7]]
    with torch.inference_mode():
        prefixes, _ = model.prefix_embeds(pixels)
        logits, lengths = uncompressed_logits(model, prefixes, images, texts)
        assert lengths.tolist() == [len(t) for t in texts]
        for row, (row_images, text) in enumerate(zip(images, texts, strict=True)):
            want = reference_uncompressed(model, pixels, row_images, text)
            torch.testing.assert_close(logits[row, : len(text)], want, atol=1e-4, rtol=0)
        single, _ = model(pixels[2:3], torch.tensor([texts[0]]), text_attends_visual=True)
        torch.testing.assert_close(logits[0, : len(texts[0])], single[0], atol=1e-4, rtol=0)


def test_the_uncompressed_pass_refuses_more_than_the_context_holds(tokenizer):
    model = make_model(tokenizer)
    limit = model.llm.config.max_position_embeddings
    k = next(k for k in range(1, 64) if not fits_uncompressed(model, k, 10))
    assert uncompressed_length(model, k - 1, 10) <= limit < uncompressed_length(model, k, 10)
    prefixes, _ = model.prefix_embeds(torch.rand(1, 3, 64, 64))
    with torch.inference_mode(), pytest.raises(ValueError, match=f"the LLM holds {limit}"):
        uncompressed_logits(model, prefixes, [[0] * k], [[5] * 10])


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


def test_a_training_view_turns_gray_at_the_rate_asked(monkeypatch):
    """Some training views lose their colors (a gray photo must still be told from the others); the
    rest keep them."""
    scene = draw_question("train", 0)[0]
    pixels = torch.from_numpy(np.array(render(scene, 64))).permute(2, 0, 1)
    rng = random.Random(0)

    def gray_share(n: int) -> float:
        views = [augmented_view(pixels, 64, ImageProcessing(), rng) for _ in range(n)]
        return sum(bool((v[0] == v[1]).all() and (v[1] == v[2]).all()) for v in views) / n

    assert 0.14 < gray_share(400) < 0.26
    monkeypatch.setattr(contrastive, "GRAY", 0.0)
    assert gray_share(50) == 0.0


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


@pytest.mark.parametrize("variant", ["hybrid", "upper"])
def test_stage2_learns_multi_image_rows_compressed_and_uncompressed(tokenizer, variant):
    """train_vlm with multi-image rows (a step's rows sharing a subset of the pool): the compressed path
    for the product, the uncompressed pass for the upper bound; both lower the loss of those rows."""
    model = make_model(tokenizer, seed=1, layout=LayoutConfig(image_marker=" (image {i})"))
    pool = procedural_pool(model, "train", 48)
    facts = facts_of_cells(pool.cells)
    rows = draw_rows(model, facts, 24, 3, random.Random(9))
    logits_of = multi_image_upper_logits if variant == "upper" else multi_image_logits

    def loss() -> float:
        with torch.no_grad():
            return answer_loss(*(lambda i, lg, s: (lg, i, s))(*logits_of(model, pool, rows))).item()

    before = loss()
    cfg = TrainConfig(
        steps=30, batch_size=4, lr=3e-3, warmup=3, eval_every=1000, easy_steps=0, freeze_vision=False,
        multi_rows=24, multi_images=3, multi_step_images=16,
    )  # fmt: skip
    train_vlm(model, pool, cfg, variant, show_progress=False)
    assert loss() < 0.5 * before, (before, loss())


def test_the_uncompressed_answer_over_one_image_is_the_single_image_upper_bound(tokenizer):
    model = sharpened(make_model(tokenizer, seed=2)).eval()
    pool = procedural_pool(model, "test", 12)
    questions = [MultiQuestion((i,), pool.questions[i], pool.answers[i], "count") for i in range(12)]
    with torch.inference_mode():
        single = predict(model, pool, upper=True)
    assert [a for a in single if a]  # the model says something
    result = multi_image_accuracy(model, pool, questions, upper=True)
    assert result["all"] == sum(a == b for a, b in zip(single, pool.answers, strict=True)) / 12
