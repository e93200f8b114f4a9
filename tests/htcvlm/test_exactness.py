"""The central invariant: decoding from a cached record is exactly the full masked pass.

Under M_hy text never attends V_hy (Eq. 6), so dropping V_hy's state and keeping only the voco state
must change nothing: same logits as the full forward over [V_hy; voco; W] (fp32, 1e-4) and the same greedy
tokens as transformers' own generate() on the full sequence.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from htcvlm.decode import DecodeBatch, decode
from htcvlm.generation import GenerationOptions
from htcvlm.mask import hybrid_mask

from .helpers import QUESTIONS, make_model

CASES = [
    (channels, fusion, attention, n_voco)
    for channels, fusion in [
        ("hybrid", "pre"),
        ("hybrid", "post"),
        ("hybrid", "mean"),
        ("continuous", "pre"),
        ("discrete", "pre"),
    ]
    for attention in ("isolated", "causal")
    for n_voco in (1, 2)
]


def case_id(case: tuple) -> str:
    return "-".join(str(x) for x in case)


@pytest.fixture(params=CASES, ids=case_id)
def setup(request, tokenizer):
    channels, fusion, attention, n_voco = request.param
    model = make_model(
        tokenizer,
        seed=len(request.node.name),
        channels=channels,
        fusion=fusion,
        visual_attention=attention,
        n_voco=n_voco,
        never_eos=True,  # every row generates its full length: the comparison covers >= 8 tokens
    )
    pixels = torch.rand(len(QUESTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(7))
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(len(QUESTIONS))])
    return model, pixels, records


def test_decode_logits_equal_full_masked_forward(setup):
    model, pixels, records = setup
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts), "questions must differ in length"
    width = max(len(p) for p in prompts)
    padded = torch.tensor([p + [model.tokenizer.pad_token_id] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        full, _ = model(pixels, padded, [len(p) for p in prompts])  # one batched full pass, right-padded
        batch = DecodeBatch(model, records, prompts)  # one batched cached pass, left-padded
    for row, prompt in enumerate(prompts):
        expected = full[row, : len(prompt)]
        got = batch.row_prompt_logits(row)
        assert got.shape == expected.shape
        err = (got - expected).abs().max().item()
        assert err < 1e-4, f"row {row}: max logit difference {err}"


def reference_generate(model, pixels: torch.Tensor, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate() on the full sequence, none of our decode code: the prefix [V_hy; voco] is
    run once under M_hy, then generate() continues with the full cache and a 2D mask that is 0 over V_hy
    (for text rows that is exactly M_hy)."""
    cfg = model.config
    with torch.inference_mode():
        prefix, _ = model.prefix_embeds(pixels[None])
        n_prefix = prefix.shape[1]
        cache = DynamicCache()
        mask = hybrid_mask(cfg.n_visual, cfg.n_voco, [0], cfg.visual_attention)
        model.llm(inputs_embeds=prefix, attention_mask=mask, cache=cache, use_cache=True)
        # The cached positions need ids only as placeholders: generate() skips what the cache holds.
        ids = torch.tensor([[model.tokenizer.pad_token_id] * n_prefix + prompt])
        attn = torch.ones_like(ids)
        attn[:, : cfg.n_visual] = 0
        out = model.llm.generate(
            input_ids=ids,
            attention_mask=attn,
            position_ids=torch.arange(ids.shape[1])[None],  # the full pass's positions, not mask-derived
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=model.tokenizer.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def test_greedy_tokens_equal_transformers_generate(setup):
    model, pixels, records = setup
    answers = decode(model, records, QUESTIONS, GenerationOptions(max_new_tokens=10))
    for row, question in enumerate(QUESTIONS):
        expected = reference_generate(model, pixels[row], model.prompt_ids(question), 10)
        got = answers[row].token_ids + (
            [model.tokenizer.eos_token_id] if answers[row].finish_reason == "eos" else []
        )
        assert got == expected, f"row {row}: {got} != {expected}"
        assert len(expected) >= 8, f"row {row} compared only {len(expected)} tokens"
