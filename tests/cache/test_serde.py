import dataclasses
import pickle
import struct

import pytest
import safetensors.torch
import torch

from cache.errors import CorruptRecordError, FingerprintMismatchError
from cache.serde import (
    KV_DTYPES,
    MAX_SOURCE_URI_BYTES,
    dequantize_int8,
    deserialize,
    quantize_int8,
    read_metadata,
    roundtrip,
    serialize,
)
from htcvlm.record import Record

from .helpers import FINGERPRINT, make_record


def assert_same_fields(a: Record, b: Record) -> None:
    assert (a.image_id, a.fingerprint, a.voco_position, a.source_uri, a.created_at) == (
        b.image_id,
        b.fingerprint,
        b.voco_position,
        b.source_uri,
        b.created_at,
    )
    assert torch.equal(a.latent, b.latent)


def test_fp32_is_bit_exact() -> None:
    rec = dataclasses.replace(make_record(), source_uri="s3://bucket/ïmage 1.png?v=2")
    out = roundtrip(rec, "fp32")
    assert_same_fields(rec, out)
    assert out.keys.dtype == torch.float32
    assert torch.equal(out.keys, rec.keys) and torch.equal(out.values, rec.values)


# Stated bounds, per element, relative to the value (fp16 / bf16 round to nearest: half an ulp) or to
# the largest magnitude in its head vector (int8: half a quantization step of amax / 127).
@pytest.mark.parametrize(("kv_dtype", "rel_bound"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float_dtypes_round_to_nearest(kv_dtype: str, rel_bound: float) -> None:
    rec = make_record(shape=(4, 4, 2, 64))
    out = roundtrip(rec, kv_dtype)  # type: ignore[arg-type]
    assert_same_fields(rec, out)
    for a, b in ((rec.keys, out.keys), (rec.values, out.values)):
        err = (b.float() - a).abs()
        assert (err <= a.abs() * rel_bound + 1e-7).all(), f"{kv_dtype} max error {err.max().item()}"


def test_int8_error_is_within_half_a_step_of_each_head_vector() -> None:
    rec = make_record(shape=(4, 4, 2, 64))
    out = roundtrip(rec, "int8")
    assert_same_fields(rec, out)
    assert out.keys.dtype == torch.float32
    for a, b in ((rec.keys, out.keys), (rec.values, out.values)):
        step = a.abs().amax(dim=-1, keepdim=True) / 127  # (L, H, n_voco, 1)
        err = (b - a).abs()
        assert (err <= step / 2 * (1 + 1e-5)).all()
        assert err.max() > 0  # it is lossy: the bound is tight enough to mean something


def test_int8_keeps_zero_rows_and_extremes() -> None:
    x = torch.zeros(1, 2, 1, 8)
    x[0, 1, 0] = torch.tensor([-4.0, 4.0, 0.5, 0, 0, 0, 0, 0])
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (1, 2, 1, 1)
    y = dequantize_int8(q, scale)
    assert torch.equal(y[0, 0], x[0, 0])  # an all-zero head comes back as zeros, not NaN
    assert y[0, 1, 0, 0] == -4.0 and y[0, 1, 0, 1] == 4.0


def test_blob_sizes_follow_the_kv_dtype() -> None:
    # paper geometry: 32 layers x 32 kv heads x 1 voco x 128 = 4096 values per layer for K and for V
    rec = make_record(shape=(32, 32, 1, 128), d=4096)
    kv_fp16 = 32 * 2 * 4096 * 2
    assert kv_fp16 == 512 * 1024
    sizes = {dt: len(serialize(rec, dt)) for dt in KV_DTYPES}  # type: ignore[arg-type]
    latent_and_header = 4096 * 4 + 4096
    assert kv_fp16 < sizes["fp16"] < kv_fp16 + latent_and_header
    assert abs(sizes["bf16"] - sizes["fp16"]) < 64  # same payload, header differs by a few bytes
    assert 2 * kv_fp16 < sizes["fp32"] < 2 * kv_fp16 + latent_and_header
    scales = 2 * 32 * 32 * 4
    assert kv_fp16 // 2 + scales < sizes["int8"] < kv_fp16 // 2 + scales + latent_and_header


def test_metadata_names_everything() -> None:
    rec = make_record()
    meta = read_metadata(serialize(rec, "int8"))
    assert meta["format_version"] == "1"
    assert meta["fingerprint"] == FINGERPRINT and meta["image_id"] == rec.image_id
    assert meta["kv_dtype"] == "int8" and meta["latent_dtype"] == "float32"
    assert meta["kv_shape"] == "2,2,1,16" and meta["voco_position"] == "580"
    assert meta["source_uri"] == rec.source_uri and float(meta["created_at"]) == rec.created_at
    assert len(meta["payload_sha256"]) == 64


def test_unknown_kv_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        serialize(make_record(), "fp8")  # type: ignore[arg-type]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_every_truncation_is_detected(kv_dtype: str) -> None:
    blob = serialize(make_record(), kv_dtype)  # type: ignore[arg-type]
    for cut in range(len(blob)):
        with pytest.raises(CorruptRecordError):
            deserialize(blob[:cut])


@pytest.mark.parametrize("kv_dtype", ["fp16", "int8"])
def test_no_bit_flip_returns_altered_state(kv_dtype: str) -> None:
    rec = make_record()
    blob = serialize(rec, kv_dtype)  # type: ignore[arg-type]
    clean = deserialize(blob)
    for pos in range(len(blob)):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x01
        try:
            out = deserialize(bytes(flipped))
        except CorruptRecordError:
            continue
        # a flip may only survive where it changes nothing decoded (e.g. header padding)
        assert_same_fields(clean, out)
        assert torch.equal(out.keys, clean.keys) and torch.equal(out.values, clean.values), pos


def test_another_models_record_is_refused() -> None:
    blob = serialize(make_record(fingerprint="other-model"))
    with pytest.raises(FingerprintMismatchError, match="other-model"):
        deserialize(blob, fingerprint=FINGERPRINT)


def test_a_blob_under_another_images_key_is_corrupt() -> None:
    blob = serialize(make_record(seed=1))
    with pytest.raises(CorruptRecordError, match="holds image"):
        deserialize(blob, image_id=make_record(seed=2).image_id)


def test_foreign_and_future_blobs_are_refused() -> None:
    plain = safetensors.torch.save({"x": torch.zeros(2)}, metadata={"format": "something else"})
    with pytest.raises(CorruptRecordError, match="not a OneToken record"):
        deserialize(plain)
    blob = bytearray(serialize(make_record()))
    n = struct.unpack("<Q", blob[:8])[0]
    header = bytes(blob[8 : 8 + n]).replace(b'"format_version":"1"', b'"format_version":"9"')
    with pytest.raises(CorruptRecordError, match="version '9'"):
        deserialize(bytes(blob[:8]) + header + bytes(blob[8 + n :]))
    with pytest.raises(CorruptRecordError):
        deserialize(b"")


def test_reading_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = serialize(make_record(), "bf16")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("stored bytes must never be unpickled")

    for module, name in ((pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    assert deserialize(blob).keys.dtype == torch.bfloat16


def test_what_is_written_can_always_be_read_back() -> None:
    """A 1 MiB source URI was written and then refused by the reader's header limit: DATA_LOSS forever.
    The serializer now refuses it, and the longest URI it keeps reads back."""
    longest = "s3://bucket/" + "é" * ((MAX_SOURCE_URI_BYTES - 12) // 2)  # multi-byte: bytes, not characters
    assert len(longest.encode()) == MAX_SOURCE_URI_BYTES
    record = dataclasses.replace(make_record(), source_uri=longest)
    assert deserialize(serialize(record), fingerprint=FINGERPRINT).source_uri == longest
    for too_long in (longest + "x", "x" * (1 << 20)):
        with pytest.raises(ValueError, match=f"over the limit of {MAX_SOURCE_URI_BYTES}"):
            serialize(dataclasses.replace(record, source_uri=too_long))
