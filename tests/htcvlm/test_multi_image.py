"""Several records in one question's context, placed exactly.

The reference needs none of our decode code: one LLM pass over [S; block_1; S_2; block_2; …; block_k;
text] with explicit positions and a mask written here from the rule alone, where block_i = [V_hy^i; sep;
voco^i] is image i's single-image compression shifted by o_i = q_i - voco_position so that its voco
lands at q_i = voco_position + (i - 1) * n_voco. Block i sees only itself and its own copy of the shared
prefix S at the same shift (block 1's copy is the S text reads); text reads S (unless the layout says
not), every voco token and itself, never a V_hy, separator or S copy. decode() from k records must give
the same logits on every prompt and generated position (fp32, 1e-4) and the same greedy tokens as
transformers' generate() continuing that pass.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from htcvlm.config import LayoutConfig
from htcvlm.decode import DecodeBatch, context_room, decode, encode_questions, max_images
from htcvlm.errors import InvalidQuestionError, PlacementError, TooManyImagesError
from htcvlm.generation import GenerationOptions
from htcvlm.placement import rotary_of, rotate_keys

from .helpers import LLAVA, QUESTIONS, VOCO_LLAMA, greedy_with_joins, make_model, sharpened

LAYOUTS = {
    "tiny": dict(),
    "llava": dict(layout=LLAVA),
    # image markers between the blocks: text placed between voco tokens, reading those before it
    "tiny-marked": dict(layout=LayoutConfig(image_marker="{i}")),  # short: 32 images must fit
    "voco-llama": dict(layout=VOCO_LLAMA, channels="continuous", visual_attention="causal", n_voco=2),
}
N_IMAGES = 32
N_NEW = 8
KINDS = {"shared": 0, "visual": 1, "sep": 2, "voco": 3, "text": 4}


@pytest.fixture(params=list(LAYOUTS), scope="module")
def setup(request, tokenizer):
    model = sharpened(make_model(tokenizer, seed=11, never_eos=True, **LAYOUTS[request.param]))
    model.name = request.param  # for the printed differences
    pixels = torch.rand(N_IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(N_IMAGES)])
    return model, pixels, records


def images_of(row: int, k: int) -> list[int]:
    """Row `row`'s k images: distinct, in an order that differs by row."""
    return [(row * 5 + 3 * i) % N_IMAGES for i in range(k)] if k < N_IMAGES else list(range(k))[::-1]


def marker_ids(model, b: int, k: int) -> list[int]:
    """Block b's marker, straight from the tokenizer: only in a question about several images."""
    template = model.config.layout.image_marker
    if k < 2 or not template:
        return []
    return model.tokenizer(template.replace("{i}", str(b + 1)), add_special_tokens=False).input_ids


def sequence(model, k: int, n_text: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Kind code, block (-1 for text) and position of every token of [S; block_1; m_1; …; S_k; block_k;
    m_k; text] (m_b: block b's marker, text), and each block's shift o_b = q_b - voco_position."""
    layout = model.layout
    part = (
        ["shared"] * layout.n_shared
        + ["visual"] * layout.n_visual
        + ["sep"] * layout.n_separator
        + ["voco"] * layout.n_voco
    )
    kinds, blocks, positions, shifts = [], [], [], []
    shift = 0
    for b in range(k):
        shifts.append(shift)
        n_marker = len(marker_ids(model, b, k))
        kinds += part + ["text"] * n_marker
        blocks += [b] * len(part) + [-1] * n_marker
        positions += range(shift, shift + len(part) + n_marker)
        shift += layout.n_voco + n_marker
    first_text = layout.voco_position + shift
    kinds += ["text"] * n_text
    blocks += [-1] * n_text
    positions += range(first_text, first_text + n_text)
    codes = torch.tensor([KINDS[x] for x in kinds])
    return codes, torch.tensor(blocks), torch.tensor(positions), shifts


def rule(model, kinds: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(L, L) True where query i may read key j. Inside a block: the single-image rule (causal, an
    isolated image token reads of the image only itself). Text: S of block 1 if the layout lets it,
    every voco token, text causally. Nothing else crosses blocks."""
    n = len(kinds)
    index = torch.arange(n)
    earlier = index[None, :] <= index[:, None]  # (L, L): key j at or before query i
    inside = (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0) & earlier
    visual = kinds == KINDS["visual"]
    if model.config.visual_attention == "isolated":
        inside &= ~(visual[:, None] & visual[None, :] & (index[:, None] != index[None, :]))
    # every voco token before it (all of them for the prompt; a marker those of its image and earlier)
    text_reads = ((kinds == KINDS["voco"]) | (kinds == KINDS["text"]))[None, :] & earlier
    if model.layout.text_attends_prefix:
        text_reads = text_reads | ((kinds == KINDS["shared"]) & (blocks == 0))[None, :]
    return torch.where((kinds == KINDS["text"])[:, None], text_reads, inside)


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """(L, L) boolean -> (1, 1, L, L) additive float mask."""
    blocked = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return blocked[None, None]


def reference_inputs(model, pixels: torch.Tensor, images: list[int], text: list[int]):
    """Embeddings (1, L, d), positions (1, L), the rule (L, L) and the kinds (L,) of the full
    multi-image sequence."""
    k = len(images)
    shared = model.embed_text(torch.tensor(model.layout.shared_ids, dtype=torch.long))  # (n_shared, d)
    parts = []
    for b, i in enumerate(images):
        marker = model.embed_text(torch.tensor(marker_ids(model, b, k), dtype=torch.long))
        parts += [shared, model.image_embeds(pixels[i : i + 1])[0][0], marker]
    embeds = torch.cat([*parts, model.embed_text(torch.tensor(text, dtype=torch.long))])[None]
    kinds, block_of, positions, _ = sequence(model, k, len(text))
    return embeds, positions[None], rule(model, kinds, block_of), kinds


@torch.inference_mode()
def reference_logits(model, pixels, images: list[int], text: list[int]) -> torch.Tensor:
    """(markers + len(text), vocab): the full masked pass's logits over every text token, the images'
    markers first."""
    embeds, positions, allowed, kinds = reference_inputs(model, pixels, images, text)
    out = model.llm(inputs_embeds=embeds, attention_mask=additive(allowed), position_ids=positions)
    return out.logits[0, kinds == KINDS["text"]]


@torch.inference_mode()
def reference_generate(model, pixels, images: list[int], prompt: list[int], n_new: int) -> list[int]:
    """transformers' generate(): the prefix before the text prefilled under the rule, then a 2D mask that
    is 0 over every V_hy, separator and S copy (and over S itself where text does not read it)."""
    embeds, positions, allowed, _ = reference_inputs(model, pixels, images, prompt)
    n_prefix = embeds.shape[1] - len(prompt)
    cache = DynamicCache()
    model.llm(
        inputs_embeds=embeds[:, :n_prefix],
        attention_mask=additive(allowed[:n_prefix, :n_prefix]),
        position_ids=positions[:, :n_prefix],
        cache=cache,
        use_cache=True,
    )
    ids = torch.tensor([[model.tokenizer.pad_token_id] * n_prefix + prompt])
    out = model.llm.generate(
        input_ids=ids,
        attention_mask=allowed[-1][None].long(),  # the last text row: what text may read, causal aside
        position_ids=positions,  # the text's part continues after the last voco token
        cache=cache,
        max_new_tokens=n_new,
        do_sample=False,
        eos_token_id=sorted(model.stop_ids),
        pad_token_id=model.tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@torch.inference_mode()
def decode_greedy(model, groups, prompts, n_new: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """DecodeBatch's logits over each row's prompt and its first n_new - 1 greedy tokens, and the tokens."""
    batch = DecodeBatch(model, groups, prompts)
    logits = [[batch.row_prompt_logits(row)] for row in range(len(prompts))]
    tokens: list[list[int]] = [[] for _ in prompts]
    last = batch.last_logits()
    for step in range(n_new):
        picked = last.argmax(dim=-1)
        for row in range(len(prompts)):
            tokens[row].append(int(picked[row]))
        if step < n_new - 1:
            last = batch.step(picked)
            for row in range(len(prompts)):
                logits[row].append(last[row : row + 1])
    return [torch.cat(rows) for rows in logits], tokens


def check_rows(model, pixels, records, images: list[list[int]]) -> float:
    """decode() of rows of several images against the full pass (logits) and generate() (tokens)."""
    questions = [QUESTIONS[r % len(QUESTIONS)] for r in range(len(images))]
    groups = [[records[i] for i in row] for row in images]
    prompts = [model.prompt_ids(q) for q in questions]
    logits, tokens = decode_greedy(model, groups, prompts, N_NEW)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        expected = reference_logits(model, pixels, images[row], prompt + tokens[row][:-1])
        assert logits[row].shape == expected.shape
        err = (logits[row] - expected).abs().max().item()
        assert err < 1e-4, f"row {row} ({len(images[row])} images): max logit difference {err}"
        worst = max(worst, err)
    answers = decode(model, groups, questions, GenerationOptions(max_new_tokens=N_NEW))
    for row, prompt in enumerate(prompts):
        expected = reference_generate(model, pixels, images[row], prompt, N_NEW)
        assert answers[row].token_ids == tokens[row] == expected, f"row {row}"
    return worst


@pytest.mark.parametrize("k", [1, 2, 5, 32])
def test_k_records_equal_the_full_pass_and_generate(setup, k):
    model, pixels, records = setup
    worst = check_rows(model, pixels, records, [images_of(row, k) for row in range(2)])
    print(f"{model.name} k={k}: max logit difference {worst:.2e}")


def test_a_batch_mixing_numbers_of_images(setup):
    model, pixels, records = setup
    worst = check_rows(model, pixels, records, [images_of(row, k) for row, k in enumerate([3, 1, 5, 2])])
    print(f"{model.name} mixed k: max logit difference {worst:.2e}")


def test_rows_of_different_k_joining_and_leaving_a_running_batch(setup):
    model, _, records = setup
    groups = [[records[i] for i in images_of(row, k)] for row, k in enumerate([2, 1, 4])]
    questions = QUESTIONS[:3]
    options = GenerationOptions(max_new_tokens=N_NEW)
    expected = [a.token_ids for a in decode(model, groups, questions, options)]
    prompts = encode_questions(model, questions, N_NEW, [len(g) for g in groups])
    assert greedy_with_joins(model, groups, prompts, N_NEW, join_after={1: 2, 2: 4}) == expected


def test_records_of_mixed_stored_dtypes_are_cast(setup):
    """fp16, bf16 and fp32 records in one row decode as the same records cast to fp32 first, bit for bit,
    and within the storage rounding of the fp32 full pass."""
    model, pixels, records = setup
    images = images_of(0, 3)

    def stored(rec, dtype):
        return replace(rec, keys=rec.keys.to(dtype), values=rec.values.to(dtype))

    dtypes = (torch.float16, torch.float32, torch.bfloat16)
    mixed = [stored(records[i], d) for i, d in zip(images, dtypes, strict=True)]
    cast = [stored(rec, torch.float32) for rec in mixed]
    prompt = model.prompt_ids(QUESTIONS[0])
    with torch.inference_mode():
        got = DecodeBatch(model, [mixed], [prompt]).row_prompt_logits(0)
        want = DecodeBatch(model, [cast], [prompt]).row_prompt_logits(0)
    assert torch.equal(got, want)
    err = (got - reference_logits(model, pixels, images, prompt)).abs().max().item()
    print(f"{model.name} mixed dtypes: max logit difference {err:.2e} from the fp32 pass")
    assert err < 1e-2, err  # measured ~1e-3: fp16 and bf16 rounding of the stored state


def test_one_record_is_the_single_record_decode_bit_for_bit(setup):
    model, _, records = setup
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    with torch.inference_mode():
        bare = DecodeBatch(model, records[:3], prompts).prompt_logits
        listed = DecodeBatch(model, [[r] for r in records[:3]], prompts).prompt_logits
    assert torch.equal(bare, listed)


@torch.inference_mode()
def test_a_moved_key_is_the_key_the_model_computes_at_its_place(setup):
    """Each block's voco keys in the reference pass's cache (computed there at q_i) are the record's
    keys (computed at voco_position) moved by q_i - voco_position."""
    model, pixels, records = setup
    layout = model.layout
    images = images_of(0, 5)
    embeds, positions, allowed, kinds = reference_inputs(model, pixels, images, [])
    shifts = sequence(model, len(images), 0)[3]
    voco_at = torch.nonzero(kinds == KINDS["voco"])[:, 0]  # indices of every block's voco tokens
    cache = DynamicCache()
    model.llm(
        inputs_embeds=embeds,
        attention_mask=additive(allowed),
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    rotary = rotary_of(model.llm)
    for b, image in enumerate(images):
        voco = voco_at[b * layout.n_voco : (b + 1) * layout.n_voco]
        # per layer (1, kv_heads, n_voco, head_dim) -> (layers, kv_heads, n_voco, head_dim)
        at_place = torch.stack([layer.keys[0, :, voco] for layer in cache.layers])
        values = torch.stack([layer.values[0, :, voco] for layer in cache.layers])
        moved = rotate_keys(records[image].keys, torch.tensor(shifts[b]), rotary)
        assert (moved - at_place).abs().max() < 1e-5, f"block {b}"
        assert (values - records[image].values).abs().max() < 1e-5, f"block {b}: values do not move"
        if b:
            assert (records[image].keys - at_place).abs().max() > 1e-2, "the move must matter"


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        # YaRN scales cos and sin by an attention factor (> 1 here): the move must not apply it again
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rotating_a_key_by_the_distance_is_rope_at_the_new_place(rope):
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=256)
    config.rope_parameters = rope
    rotary = LlamaRotaryEmbedding(config)
    raw = torch.randn(1, 3, 4, 32, generator=torch.Generator().manual_seed(0))  # (B, heads, n, head_dim)

    def rope_at(position: int) -> torch.Tensor:
        cos, sin = rotary(raw, torch.full((1, 4), position))
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    for p, q in [(7, 7), (7, 12), (40, 97), (97, 40)]:
        moved = rotate_keys(rope_at(p), torch.tensor(q - p), rotary)
        assert (moved - rope_at(q)).abs().max() < 1e-5, f"{rope['rope_type']}: {p} -> {q}"
    assert torch.equal(rotate_keys(rope_at(7), torch.tensor(0), rotary), rope_at(7))


def test_a_rope_that_is_not_a_fixed_rotation_is_refused_for_several_images(tokenizer):
    model = make_model(tokenizer, seed=2)
    records = model.compress_pixels(torch.rand(2, 3, 64, 64), [f"{i:064x}" for i in range(2)])
    model.llm.model.rotary_emb.rope_type = "dynamic"
    prompt = [model.prompt_ids("Color?")]
    with torch.inference_mode():
        DecodeBatch(model, [records[0]], prompt)  # one image: nothing moves, nothing to refuse
        with pytest.raises(PlacementError, match=r"rope_type 'dynamic' is not a fixed rotation"):
            DecodeBatch(model, [records], prompt)


def test_the_number_of_images_is_bounded_by_the_context(setup):
    model, _, records = setup
    layout, most = model.layout, max_images(model)
    limit = model.llm.config.max_position_embeddings
    assert context_room(model, most) >= 2 > context_room(model, most + 1)
    markers = sum(len(marker_ids(model, b, 3)) for b in range(3))
    assert context_room(model, 3) == limit - layout.voco_position - 3 * layout.n_voco - markers
    with pytest.raises(TooManyImagesError, match=rf"asks about {most + 1} images.*at most {most} images"):
        encode_questions(model, ["Color?"], 1, most + 1)
    prompt = model.prompt_ids("Color?")
    fits = max(k for k in range(1, most + 1) if context_room(model, k) >= len(prompt) + N_NEW)
    assert len(encode_questions(model, ["Color?"], N_NEW, fits)[0]) == len(prompt)
    with pytest.raises(InvalidQuestionError, match=rf"after {fits + 1} images.*fewer images"):
        encode_questions(model, ["Color?"], N_NEW, fits + 1)
    many = [records[i % N_IMAGES] for i in range(most + 1)]
    with pytest.raises(TooManyImagesError):
        decode(model, [many], ["Color?"], GenerationOptions(max_new_tokens=1))
    with pytest.raises(ValueError, match="row 0 has no record"):
        decode(model, [[]], ["Color?"])
