"""Record <-> bytes: safetensors tensors plus string metadata, checksummed, never pickled.

Layout of one blob (the safetensors format: u64 header length, JSON header, raw tensor bytes):
- tensors `latent` (d,), `keys` and `values` (n_layers, n_kv_heads, n_voco, head_dim) in the KV dtype,
  and for int8 also `keys_scale` / `values_scale` (n_layers, n_kv_heads, n_voco, 1) in fp32;
- metadata: format, format_version, fingerprint, image_id, kv_dtype, latent_dtype, kv_shape,
  voco_position, created_at, source_uri, and payload_sha256 over every other field and every tensor.

int8 is symmetric with one fp32 scale per (layer, kv head, voco token) vector of head_dim values, i.e.
per attention-head channel. A scale per head_dim element would degenerate with one voco token into one
fp32 scale per int8 value (5 bytes per value instead of 2 for fp16); per head keeps the scales at
1/head_dim of the payload (3 % at paper size) and bounds each value's error by amax(row) / 254.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cache.dtypes import KV_DTYPES, KvDtype
from cache.errors import CorruptRecordError, FingerprintMismatchError
from htcvlm.record import Record

logger = logging.getLogger(__name__)


FORMAT = "onetoken.record"
FORMAT_VERSION = "1"

_TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_INT8_MAX = 127
_MAX_HEADER_BYTES = 1 << 20  # a real header is < 2 KiB; a bigger length field means corruption
# The longest source URI a record keeps (UTF-8 bytes): twice Linux's PATH_MAX, beyond any URL a browser
# or server accepts. The service refuses longer ones where requests come in; serialize() refuses them too,
# so every blob written stays far below the header limit its reader enforces.
MAX_SOURCE_URI_BYTES = 8192


def check_source_uri(source_uri: str) -> None:
    """Raise ValueError, saying the limit, for a source URI a record cannot keep."""
    size = len(source_uri.encode())
    if size > MAX_SOURCE_URI_BYTES:
        raise ValueError(
            f"source_uri is {size} bytes, over the limit of {MAX_SOURCE_URI_BYTES}; send a shorter one"
        )


def _check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per last-axis row: (..., head_dim) -> int8 (..., head_dim), fp32 (..., 1)."""
    x32 = x.to(torch.float32)
    amax = x32.abs().amax(dim=-1, keepdim=True)
    # An all-zero row would divide by zero; any positive scale encodes it exactly as zeros.
    scale = (amax / _INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x32 / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale


def _payload_sha256(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (but the checksum itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(metadata):
        if name != "payload_sha256":
            h.update(f"{name}={metadata[name]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        # view as bytes so bf16 (unknown to numpy) hashes like every other dtype
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def serialize(record: Record, kv_dtype: KvDtype = "fp16") -> bytes:
    """Encode `record` with its key/value state stored as `kv_dtype`.

    Raises ValueError for what no reader could take back (a source URI over MAX_SOURCE_URI_BYTES)."""
    _check_kv_dtype(kv_dtype)
    check_source_uri(record.source_uri)
    tensors: dict[str, torch.Tensor] = {"latent": record.latent.detach().cpu().contiguous()}
    for name, kv in (("keys", record.keys), ("values", record.values)):
        kv = kv.detach().cpu()
        if kv_dtype == "int8":
            tensors[name], tensors[f"{name}_scale"] = quantize_int8(kv)
        else:
            tensors[name] = kv.to(_TORCH_DTYPES[kv_dtype]).contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": record.fingerprint,
        "image_id": record.image_id,
        "kv_dtype": kv_dtype,
        "latent_dtype": str(record.latent.dtype).removeprefix("torch."),
        "kv_shape": ",".join(str(n) for n in record.keys.shape),
        "voco_position": str(record.voco_position),
        "created_at": repr(float(record.created_at)),
        "source_uri": record.source_uri,
    }
    metadata["payload_sha256"] = _payload_sha256(metadata, tensors)
    blob = save_safetensors(tensors, metadata=metadata)
    (header_bytes,) = struct.unpack("<Q", blob[:8])
    if header_bytes > _MAX_HEADER_BYTES:  # whatever field grew it: never write what read_metadata refuses
        raise ValueError(f"record header is {header_bytes} bytes, over the reader's {_MAX_HEADER_BYTES}")
    return blob


def _header(blob: bytes) -> dict[str, Any]:
    """The safetensors JSON header of a blob (or of a prefix holding all of it); raises CorruptRecordError."""
    if len(blob) < 8:
        raise CorruptRecordError(f"record blob of {len(blob)} bytes is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(blob):
        raise CorruptRecordError(f"record header length {n} does not fit a blob of {len(blob)} bytes")
    try:
        header = json.loads(blob[8 : 8 + n])
        metadata = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptRecordError(f"record header is not valid safetensors JSON with metadata: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CorruptRecordError(f"not a OneToken record (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CorruptRecordError(
            f"record format version {metadata.get('format_version')!r} is not {FORMAT_VERSION!r}; "
            "re-encode the image with this version"
        )
    return header


def read_metadata(blob: bytes) -> dict[str, str]:
    """The string metadata of a blob without decoding its tensors; raises CorruptRecordError."""
    return _header(blob)["__metadata__"]


# safetensors dtype -> little-endian numpy dtype of a stored latent (bf16 is read as the top half of fp32)
_LATENT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_latent(prefix: bytes, *, fingerprint: str, image_id: str) -> np.ndarray | int:
    """A record's latent (d,) as float32 from the first bytes of its blob, or, when `prefix` is too short
    to hold it, how many bytes from the start are needed (a store's `get_prefixes` then reads that many).

    safetensors puts wider dtypes first, so with fp16/bf16/int8 K/V the fp32 latent sits right after the
    header (~1 KiB in); with fp32 K/V it follows the keys. Checks the format, the model, the image id and
    the latent's dtype and shape, raising CorruptRecordError or FingerprintMismatchError as `deserialize`
    does; it cannot check the payload checksum, which covers the K/V bytes left unread.
    """
    if len(prefix) < 8:
        return 8
    (n,) = struct.unpack("<Q", prefix[:8])
    if n <= _MAX_HEADER_BYTES and len(prefix) < 8 + n:
        return 8 + n
    header = _header(prefix)
    metadata = header["__metadata__"]
    if metadata.get("fingerprint") != fingerprint:
        raise FingerprintMismatchError(
            f"record of image {metadata.get('image_id')} belongs to model {metadata.get('fingerprint')!r}, "
            f"not {fingerprint!r}; re-encode the image with this model"
        )
    if metadata.get("image_id") != image_id:
        raise CorruptRecordError(f"blob stored under image {image_id} holds image {metadata.get('image_id')}")
    try:
        entry = header["latent"]
        dtype = _LATENT_DTYPES[entry["dtype"]]
        (d,) = entry["shape"]
        start, stop = (8 + n + int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecordError(f"record of image {image_id} has no usable latent entry: {e}") from e
    if stop - start != d * 2 * (1 + (dtype == "<f4")) or d <= 0:
        raise CorruptRecordError(f"latent of image {image_id} spans {stop - start} bytes for {d} values")
    if len(prefix) < stop:
        return stop
    raw = np.frombuffer(prefix, dtype=dtype, count=d, offset=start)
    if dtype == "<u2":  # bf16: the high 16 bits of an fp32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)  # always a copy: the prefix buffer is not kept


def deserialize(blob: bytes, *, fingerprint: str | None = None, image_id: str | None = None) -> Record:
    """Decode and verify a blob. int8 state comes back dequantized to fp32, other dtypes as stored.

    Raises CorruptRecordError for anything truncated, altered or inconsistent, and
    FingerprintMismatchError when `fingerprint` is given and the record belongs to another model.
    `image_id`, when given, must match too (a mismatch means the store mixed up keys: corruption).
    """
    metadata = read_metadata(blob)
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as e:
        raise CorruptRecordError(f"record tensors cannot be decoded: {e}") from e
    # checksum before the fingerprint test, so a flipped bit there reads as corruption, not another model
    if metadata.get("payload_sha256") != _payload_sha256(metadata, tensors):
        raise CorruptRecordError(f"record of image {metadata.get('image_id')} fails its payload checksum")
    if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
        raise FingerprintMismatchError(
            f"record of image {metadata.get('image_id')} belongs to model {metadata.get('fingerprint')!r}, "
            f"not {fingerprint!r}; re-encode the image with this model"
        )
    if image_id is not None and metadata["image_id"] != image_id:
        raise CorruptRecordError(f"blob stored under image {image_id} holds image {metadata['image_id']}")
    try:
        return _record_from(metadata, tensors)
    except (KeyError, ValueError) as e:
        # the checksum passed, so this is a writer bug or a foreign blob, still never usable state
        raise CorruptRecordError(f"record fields are inconsistent: {e}") from e


def _record_from(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Record:
    kv_dtype = metadata["kv_dtype"]
    _check_kv_dtype(kv_dtype)
    keys, values = tensors["keys"], tensors["values"]
    if kv_dtype == "int8":
        keys = dequantize_int8(keys, tensors["keys_scale"])
        values = dequantize_int8(values, tensors["values_scale"])
    shape = tuple(int(n) for n in metadata["kv_shape"].split(","))
    if tuple(keys.shape) != shape or tuple(values.shape) != shape:
        raise ValueError(f"kv shape {tuple(keys.shape)} does not match the recorded {shape}")
    return Record(
        image_id=metadata["image_id"],
        fingerprint=metadata["fingerprint"],
        latent=tensors["latent"],
        keys=keys,
        values=values,
        voco_position=int(metadata["voco_position"]),
        source_uri=metadata["source_uri"],
        created_at=float(metadata["created_at"]),
    )


def roundtrip(record: Record, kv_dtype: KvDtype) -> Record:
    """`record` as it comes back from the cache when stored as `kv_dtype` (for decode-error measurements)."""
    return deserialize(serialize(record, kv_dtype), fingerprint=record.fingerprint)
