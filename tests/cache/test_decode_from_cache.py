"""The cache must change nothing: decoding from a stored record is decoding from the fresh one."""

from __future__ import annotations

import pytest
import torch

from cache.dtypes import KV_DTYPES
from cache.records import get_record, put_records
from cache.serde import roundtrip
from cache.store import RecordStore
from htcvlm.decode import DecodeBatch, decode
from htcvlm.generation import GenerationOptions

QUESTIONS = ["what color is the circle?", "how many objects are there in this picture?"]


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


@pytest.fixture(scope="module")
def records(model):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model.compress_pixels(pixels, ["a" * 64, "b" * 64])


def test_fp32_through_a_store_decodes_bit_identically(store: RecordStore, model, records):
    keys = put_records(store, records, kv_dtype="fp32")
    stored = [get_record(store, k) for k in keys]
    opts = GenerationOptions(max_new_tokens=6)
    assert [a.token_ids for a in decode(model, stored, QUESTIONS, opts)] == [
        a.token_ids for a in decode(model, records, QUESTIONS, opts)
    ]
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    with torch.inference_mode():
        fresh, cached = DecodeBatch(model, records, prompts), DecodeBatch(model, stored, prompts)
    assert torch.equal(fresh.prompt_logits, cached.prompt_logits)


@pytest.mark.parametrize("kv_dtype", [d for d in KV_DTYPES if d != "fp32"])
def test_lossy_dtypes_stay_close(model, records, kv_dtype):
    prompts = [model.prompt_ids(q) for q in QUESTIONS]
    lossy = [roundtrip(r, kv_dtype) for r in records]
    with torch.inference_mode():
        err = (
            (
                DecodeBatch(model, records, prompts).prompt_logits
                - DecodeBatch(model, lossy, prompts).prompt_logits
            )
            .abs()
            .max()
            .item()
        )
    assert 0 < err < 0.05, f"{kv_dtype}: max logit error {err}"
