"""The CUDA paths (GPU hosts only; skipped without a GPU): exact cached decoding in fp32 on the GPU,
the measured error of bf16 decoding, and rows joining a running batch on the GPU."""

from __future__ import annotations

import pytest
import torch

from htcvlm.decode import DecodeBatch, decode, encode_questions
from htcvlm.generation import GenerationOptions

from .helpers import QUESTIONS, greedy_with_joins, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def setup(tokenizer):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the 1e-4 comparison
    torch.backends.cudnn.allow_tf32 = False
    model = make_model(tokenizer, seed=1, never_eos=True).cuda()
    pixels = torch.rand(len(QUESTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(7)).cuda()
    return model, pixels


def full_logits(model, pixels, prompts):
    width = max(len(p) for p in prompts)
    padded = torch.tensor([p + [model.tokenizer.pad_token_id] * (width - len(p)) for p in prompts]).cuda()
    full, _ = model(pixels, padded, [len(p) for p in prompts])
    return full


@torch.inference_mode()
def test_fp32_decode_on_gpu_equals_the_full_pass(setup):
    model, pixels = setup
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(len(QUESTIONS))])
    assert records[0].keys.device.type == "cpu"  # records leave the GPU: they go to the store
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    full = full_logits(model, pixels, prompts)
    batch = DecodeBatch(model, records, prompts)
    for row, prompt in enumerate(prompts):
        err = (batch.row_prompt_logits(row) - full[row, : len(prompt)]).abs().max().item()
        assert err < 1e-4, f"row {row}: {err}"


@torch.inference_mode()
def test_bf16_decode_error_is_small_and_measured(setup):
    model, pixels = setup
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    reference = full_logits(model, pixels, prompts).float()  # fp32 full pass
    model = model.to(torch.bfloat16)
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(len(QUESTIONS))])
    batch = DecodeBatch(model, records, prompts)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        got = batch.row_prompt_logits(row).float()
        expected = reference[row, : len(prompt)]
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    print(f"bf16 cached decode vs fp32 full pass: max logit error {worst:.2e} of the logit range")
    assert worst < 5e-2


@torch.inference_mode()
def test_rows_joining_a_running_batch_on_gpu(setup):
    model, pixels = setup
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(len(QUESTIONS))])
    expected = [a.token_ids for a in decode(model, records, QUESTIONS, GenerationOptions(max_new_tokens=6))]
    prompts = encode_questions(model, QUESTIONS, 6)
    got = greedy_with_joins(model, records, prompts, 6, join_after={1: 0, 2: 1})
    assert got == expected


def test_a_checkpoint_loads_straight_onto_the_gpu_in_its_dtype(tmp_path, tokenizer):
    """device="auto" on a GPU host: every weight read onto the GPU in the dtype asked for, no fp32 copy
    there either, and the buffers computed on the GPU."""
    from htcvlm.checkpoint import load_pretrained, save_pretrained

    model = make_model(tokenizer, seed=1)
    folder = save_pretrained(model, tmp_path / "m", max_shard_size=500_000)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_pretrained(folder, "auto", dtype="bf16")
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert {t.device.type for t in tensors} == {"cuda"}
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    bf16_bytes = sum(p.numel() * 2 for p in loaded.parameters())
    # one fp32 tensor at a time is read before its cast: never the fp32 model (twice the bf16 bytes)
    assert torch.cuda.max_memory_allocated() - before < 1.5 * bf16_bytes
    on_cpu = load_pretrained(folder, "cpu", dtype="bf16")
    assert loaded.fingerprint() == on_cpu.fingerprint()
