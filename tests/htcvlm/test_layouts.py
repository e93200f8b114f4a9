"""The central invariant in the real checkpoints' sequence layouts, beside the tiny model's.

- LLaVA-built HTC-VLM: [BOS, system, " USER: "] · V_hy · voco · question " ASSISTANT:"; text reads the
  shared prefix, the voco token and itself, never V_hy.
- VoCo-LLaMA: BOS · image tokens (causal) · " \\n" · voco voco · "\\n" system " USER: " question
  " ASSISTANT:"; every query after the last voco reads only keys from the first voco on.

decode() from (the model's shared prefix state + records) must equal the full masked pass over the whole
sequence under a mask written here from each rule alone (fp32, 1e-4), and transformers' generate() on the
full sequence must give the same greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.config import LayoutConfig
from htcvlm.decode import DecodeBatch, context_room, decode, encode_questions
from htcvlm.generation import GenerationOptions
from htcvlm.mask import to_additive

from .helpers import LLAVA, QUESTIONS, SYSTEM, VOCO_LLAMA, greedy_with_joins, make_model, png_bytes, sharpened

CASES = {
    "llava-hybrid-isolated": dict(layout=LLAVA, visual_attention="isolated", n_voco=1),
    "llava-hybrid-causal-2voco": dict(layout=LLAVA, visual_attention="causal", n_voco=2),
    "voco-llama": dict(layout=VOCO_LLAMA, channels="continuous", visual_attention="causal", n_voco=2),
    "voco-llama-hybrid": dict(layout=VOCO_LLAMA, visual_attention="causal", n_voco=2),
}


def kinds_of(model, n_text: int) -> list[str]:
    """What each position of the full sequence holds: shared, visual, sep, voco or text."""
    layout = model.layout
    return (
        ["shared"] * layout.n_shared
        + ["visual"] * layout.n_visual
        + ["sep"] * layout.n_separator
        + ["voco"] * layout.n_voco
        + ["text"] * n_text
    )


def llava_rule(kinds: list[str], visual_attention: str) -> torch.Tensor:
    """Causal, except: text never reads V_hy or a separator; an isolated image token reads, of the image,
    only itself (and the shared text before it)."""
    n = len(kinds)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            hidden_from_text = kinds[i] == "text" and kinds[j] in ("visual", "sep")
            isolated = visual_attention == "isolated" and kinds[i] == kinds[j] == "visual" and i != j
            allowed[i, j] = not (hidden_from_text or isolated)
    return allowed


def voco_llama_rule(kinds: list[str], visual_attention: str) -> torch.Tensor:
    """Every query after the last voco may attend only keys from the first voco on; everything else (the
    image tokens among themselves included) is causal."""
    assert visual_attention == "causal"
    n = len(kinds)
    first_voco = kinds.index("voco")
    last_voco = n - 1 - kinds[::-1].index("voco")
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[last_voco + 1 :, :first_voco] = False
    return allowed


def reference_allowed(model, n_text: int) -> torch.Tensor:
    rule = llava_rule if model.config.layout.text_attends_prefix else voco_llama_rule
    return rule(kinds_of(model, n_text), model.config.visual_attention)


@pytest.fixture(params=list(CASES), scope="module")
def setup(request, tokenizer):
    model = make_model(tokenizer, seed=len(request.param), never_eos=True, **CASES[request.param])
    sharpened(model)
    pixels = torch.rand(len(QUESTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(5))
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(len(QUESTIONS))])
    return model, pixels, records


def test_the_layout_is_the_checkpoints_sequence(setup, tokenizer):
    model, _, records = setup
    layout, cfg = model.layout, model.config
    bos = tokenizer.bos_token_id
    if cfg.layout == LLAVA:
        assert layout.shared_ids == (bos, *tokenizer(f"{SYSTEM} USER: ", add_special_tokens=False).input_ids)
        assert layout.n_separator == 0
        assert (
            model.prompt_ids(" Color? ") == tokenizer("Color? ASSISTANT:", add_special_tokens=False).input_ids
        )
    else:
        assert layout.shared_ids == (bos,) and layout.n_separator == 2
        assert (
            model.prompt_ids("Color?")
            == tokenizer(f"\n{SYSTEM} USER: Color? ASSISTANT:", add_special_tokens=False).input_ids
        )
    assert layout.voco_position == layout.n_shared + cfg.n_visual + layout.n_separator
    assert all(r.voco_position == layout.voco_position and r.n_voco == cfg.n_voco for r in records)
    assert context_room(model) == cfg.llm.max_position_embeddings - layout.voco_position - cfg.n_voco


def test_the_mask_is_the_rule(setup):
    model, _, _ = setup
    mask = model.layout.mask([7])[0, 0]  # (L, L)
    assert torch.equal(mask == 0, reference_allowed(model, 7))


def test_decode_logits_equal_the_full_pass_under_the_rule(setup):
    """Three images and three question lengths in one batch, against (a) the model's batched forward and
    (b) one plain LLM pass per row over the whole sequence under the rule's own mask."""
    model, pixels, records = setup
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    width = max(len(p) for p in prompts)
    padded = torch.tensor([p + [model.tokenizer.pad_token_id] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        batch = DecodeBatch(model, records, prompts)
        forward, _ = model(pixels, padded, [len(p) for p in prompts])
        prefix, _ = model.prefix_embeds(pixels)
    for row, prompt in enumerate(prompts):
        embeds = torch.cat([prefix[row : row + 1], model.embed_text(torch.tensor([prompt]))], dim=1)
        with torch.inference_mode():
            full = model.llm(
                inputs_embeds=embeds,
                attention_mask=to_additive(reference_allowed(model, len(prompt)))[None, None],
                position_ids=torch.arange(embeds.shape[1])[None],
            ).logits[0, prefix.shape[1] :]
        got = batch.row_prompt_logits(row)
        for name, expected in (("rule", full), ("forward", forward[row, : len(prompt)])):
            err = (got - expected).abs().max().item()
            assert err < 1e-4, f"row {row}: max logit difference {err} from the {name} pass"


def reference_generate(model, pixels: torch.Tensor, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate() on the full sequence, none of our decode code: everything before the text
    runs once under the rule, then generate() continues with the full cache and a 2D mask that is 0 over
    the keys text may not read (for text rows that is exactly the rule)."""
    n_prefix = model.layout.text_position
    allowed = reference_allowed(model, len(prompt))
    with torch.inference_mode():
        prefix, _ = model.prefix_embeds(pixels[None])
        cache = DynamicCache()
        model.llm(
            inputs_embeds=prefix,
            attention_mask=to_additive(allowed[:n_prefix, :n_prefix])[None, None],
            position_ids=torch.arange(n_prefix)[None],
            cache=cache,
            use_cache=True,
        )
        ids = torch.tensor([[model.tokenizer.pad_token_id] * n_prefix + prompt])
        attn = allowed[-1][None].long()  # the last text row: 1 where text may read, causal aside
        out = model.llm.generate(
            input_ids=ids,
            attention_mask=attn,
            position_ids=torch.arange(ids.shape[1])[None],  # the full pass's positions, not mask-derived
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(model.stop_ids),
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def test_greedy_tokens_equal_transformers_generate(setup):
    model, pixels, records = setup
    answers = decode(model, records, QUESTIONS, GenerationOptions(max_new_tokens=10))
    for row, question in enumerate(QUESTIONS):
        expected = reference_generate(model, pixels[row], model.prompt_ids(question), 10)
        assert answers[row].finish_reason == "length"
        assert answers[row].token_ids == expected, f"row {row}: {answers[row].token_ids} != {expected}"
        assert len(expected) == 10


def test_rows_joining_and_leaving_a_running_batch_keep_their_answers(setup):
    """Continuous batching with a shared prefix: rows joining mid-way are left-padded in front of the
    shared prefix, rows leaving trim dead columns; no row's answer changes."""
    model, _, records = setup
    expected = [a.token_ids for a in decode(model, records, QUESTIONS, GenerationOptions(max_new_tokens=8))]
    prompts = encode_questions(model, QUESTIONS, 8)
    assert greedy_with_joins(model, records, prompts, 8, join_after={1: 2, 2: 4}) == expected


def test_the_shared_prefix_is_computed_once_and_again_after_a_weight_changes(tokenizer, monkeypatch):
    model = make_model(tokenizer, seed=4, layout=LLAVA)
    calls = []
    compute = model._compute_shared_prefix
    monkeypatch.setattr(model, "_compute_shared_prefix", lambda: calls.append(1) or compute())
    first = model.shared_prefix()
    k, v = first[0]
    assert k.shape == (1, model.llm.config.num_key_value_heads, model.layout.n_shared, model.llm_head_dim)
    records = model.compress([png_bytes(s) for s in range(2)])
    decode(model, records, QUESTIONS[:2], GenerationOptions(max_new_tokens=2))
    assert model.shared_prefix() is first and len(calls) == 1
    with torch.no_grad():
        model.llm.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    assert len(calls) == 1
    again = model.shared_prefix()
    assert len(calls) == 2 and not torch.equal(again[0][0], k)
    assert torch.equal(again[0][1], v)  # values of layer 0 do not read k_proj


def test_encoder_and_decoder_processes_share_the_prefix_state(tokenizer, tmp_path):
    """Two loads of one checkpoint (the encoder's and the worker's) compute the same shared prefix state,
    so a record made by one decodes in the other exactly as in its maker."""
    encoder = load_pretrained(save_pretrained(make_model(tokenizer, seed=6, layout=LLAVA), tmp_path))
    worker = load_pretrained(tmp_path)
    assert worker.fingerprint() == encoder.fingerprint()
    for (ka, va), (kb, vb) in zip(encoder.shared_prefix(), worker.shared_prefix(), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    records = encoder.compress([png_bytes(s) for s in range(2)])
    prompts = [worker.prompt_ids(q) for q in QUESTIONS[:2]]
    with torch.inference_mode():
        there = DecodeBatch(encoder, records, prompts).prompt_logits
        here = DecodeBatch(worker, records, prompts).prompt_logits
    assert torch.equal(there, here)
    assert worker.config.layout == LLAVA


def test_a_stop_token_ends_the_answer_and_is_not_part_of_it(tokenizer):
    model = make_model(tokenizer, seed=8, never_eos=True, layout=LayoutConfig(stop_tokens=("?",)))
    stop = tokenizer.convert_tokens_to_ids("?")
    assert model.stop_ids == {tokenizer.eos_token_id, stop}
    with torch.no_grad():
        model.llm.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.llm.lm_head.bias[stop] = 1e4  # "?" is every step's argmax
    answer = decode(model, model.compress([png_bytes(0)]), ["hi"], GenerationOptions(max_new_tokens=5))[0]
    assert (answer.finish_reason, answer.token_ids, answer.text) == ("eos", [], "")


def test_a_layout_the_tokenizer_cannot_spell_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"stop tokens \['<\|im_end\|>'\] are not tokens"):
        make_model(tokenizer, layout=LayoutConfig(stop_tokens=("<|im_end|>",)))
    with pytest.raises(ValueError, match=r"'\{question\}' exactly once"):
        LayoutConfig(prompt="Answer:")
    with pytest.raises(ValueError, match="belongs in prompt only"):
        LayoutConfig(before_image="{question}", prompt="{question}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_decode_on_gpu_equals_the_full_pass(case, tokenizer, monkeypatch):
    """The shared prefix state lives on the model's device: compress and decode on the GPU stay exact."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 means fp32 for 1e-4
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = sharpened(make_model(tokenizer, seed=len(case), never_eos=True, **CASES[case])).cuda()
    pixels = torch.rand(len(QUESTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(5)).cuda()
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    width = max(len(p) for p in prompts)
    padded = torch.tensor([p + [model.tokenizer.pad_token_id] * (width - len(p)) for p in prompts]).cuda()
    with torch.inference_mode():
        records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(len(QUESTIONS))])
        full, _ = model(pixels, padded, [len(p) for p in prompts])
        batch = DecodeBatch(model, records, prompts)
    assert model.shared_prefix()[0][0].device.type == "cuda"
    for row, prompt in enumerate(prompts):
        err = (batch.row_prompt_logits(row) - full[row, : len(prompt)]).abs().max().item()
        assert err < 1e-4, f"row {row}: {err}"
