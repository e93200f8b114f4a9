"""Several records in one context: each image's voco state moved, exactly, to its place in the sequence.

    [S] · voco^1 · m_1 · voco^2 · m_2 · … · voco^k · m_k · prompt(question) · answer
          q_1            q_2                 q_k            text_position(k)

A record's keys were cached after the rotary embedding at the voco position p = layout.voco_position.
Image i's voco tokens go to q_i = p + (offset of slot i): after the voco tokens and the markers m_j of
the images before it, the places they would have in a sequence that held every image one after another.
A marker is the layout's `image_marker` text for image i ("(image 3)"), only in a question about several
images; it is text, computed with the prompt, and reads the voco tokens before it. The prompt starts
after the last one. With k = 1 nothing moves and there is no marker, so one record is decoded exactly as
it always was.

Why a move is exact: RoPE turns each pair of a key's features by an angle proportional to its position,
pos * inv_freq, and rotations compose, so the key the model would have cached at q is the cached key
turned by (q - p) * inv_freq: k' = k cos(Δθ) + rotate_half(k) sin(Δθ). Values carry no position and do
not move. What the moved key stands for is image i compressed on its own, its V_hy, separator and a copy
of the shared prefix shifted by q_i - p, seen by nothing but its own voco tokens (as in M_hy); RoPE
attention depends only on relative positions, so that block's voco keys and values are exactly those of
the record, turned. Text then reads S (when the layout says so), every voco token before it and itself.

This holds only where the rotary embedding is a fixed rotation per position: RoPE types whose
frequencies do not depend on the sequence (`PURE_ROTATION`). YaRN scales cos and sin by a constant
attention factor: the cached key carries it once already, so the move turns by cos and sin unscaled.
Dynamic NTK and LongRoPE change their frequencies with the sequence length: moving a key under them is
refused (`PlacementError`) rather than made approximate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from htcvlm.errors import PlacementError
from htcvlm.layout import SequenceLayout
from htcvlm.record import Record

# transformers' rope_type values whose inv_freq is fixed at init: position q's rotation is q * inv_freq.
PURE_ROTATION = frozenset({"default", "linear", "llama3", "yarn"})

# A row of a batch: one record (one image) or several, in the order the question refers to them.
Records = Record | Sequence[Record]


def record_groups(rows: Sequence[Records]) -> list[tuple[Record, ...]]:
    """Each row's records as a tuple: a bare `Record` is a row of one image; an empty row is refused."""
    groups = [(row,) if isinstance(row, Record) else tuple(row) for row in rows]
    for i, group in enumerate(groups):
        if not group:
            raise ValueError(f"row {i} has no record: every question needs at least one image")
        if not all(isinstance(r, Record) for r in group):
            raise TypeError(f"row {i} must be a Record or a sequence of Records, got {group!r}")
    return groups


def markers(layout: SequenceLayout, n_records: int) -> list[tuple[int, ...]]:
    """Each image's marker token ids in a question about `n_records` images (none for one image)."""
    return [layout.marker_ids(i) if n_records > 1 else () for i in range(n_records)]


def slot_offsets(layout: SequenceLayout, n_records: int) -> list[int]:
    """q_i - p for each image: slot i follows the voco tokens and markers of the slots before it. Slot
    i's offset is the same in every question of two or more images, so one batch shares them."""
    offsets, at = [], 0
    for marker in markers(layout, n_records):
        offsets.append(at)
        at += layout.n_voco + len(marker)
    return offsets


def voco_positions(layout: SequenceLayout, n_records: int) -> list[int]:
    """q_1 … q_k: where each record's first voco token sits in a context of `n_records` images."""
    return [layout.voco_position + o for o in slot_offsets(layout, n_records)]


def text_position(layout: SequenceLayout, n_records: int) -> int:
    """The first prompt position after `n_records` images and their markers (layout.text_position for
    one)."""
    return voco_positions(layout, n_records)[-1] + layout.n_voco + len(markers(layout, n_records)[-1])


def row_text(layout: SequenceLayout, n_records: int, prompt: Sequence[int]) -> tuple[list[int], list[int]]:
    """A row's text after its images, in position order: each image's marker then the prompt (and
    what follows it); and each token's position."""
    ids: list[int] = []
    positions: list[int] = []
    for marker, q in zip(markers(layout, n_records), voco_positions(layout, n_records), strict=True):
        ids += marker
        positions += range(q + layout.n_voco, q + layout.n_voco + len(marker))
    first = text_position(layout, n_records)
    return ids + list(prompt), positions + list(range(first, first + len(prompt)))


def voco_key_positions(layout: SequenceLayout, n_slots: int) -> list[int]:
    """The position of every placed voco key column, slot by slot (the columns of `place_states`)."""
    return [q + j for q in voco_positions(layout, n_slots) for j in range(layout.n_voco)]


def rotary_of(llm: nn.Module) -> nn.Module:
    """The LLM's rotary embedding module (a LLaMA-family `...RotaryEmbedding` with inv_freq)."""
    rotary = getattr(getattr(llm, "model", llm), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise PlacementError(
            f"{type(llm).__name__} has no rotary embedding with inv_freq at .model.rotary_emb; "
            "records can only be moved under a LLaMA-family rotary embedding"
        )
    return rotary


def check_pure_rotation(rotary: nn.Module) -> None:
    """Raise `PlacementError` unless moving a key is a pure rotation under this rotary embedding."""
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in PURE_ROTATION:
        raise PlacementError(
            f"rope_type {rope_type!r} is not a fixed rotation per position (its frequencies depend on the "
            f"sequence length), so a cached key cannot be moved exactly; several images in one question "
            f"need one of {sorted(PURE_ROTATION)}"
        )


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """Post-RoPE keys (..., n, head_dim) moved by `delta` positions, broadcastable to keys.shape[:-1].

    Computed in at least fp32 and returned in keys' dtype. A delta of 0 returns the keys bit for bit
    (cos 0 = 1 and sin 0 = 0 exactly).
    """
    check_pure_rotation(rotary)
    work = torch.promote_types(keys.dtype, torch.float32)
    inv_freq = rotary.inv_freq.to(device=keys.device, dtype=torch.float32)  # (head_dim / 2,)
    freqs = delta.to(device=keys.device, dtype=torch.float32)[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (..., head_dim): rotate_half's pairing (i, i + d/2)
    x = keys.to(work)
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half(x)
    return (x * angles.cos().to(work) + turned * angles.sin().to(work)).to(keys.dtype)


def place_records(
    groups: Sequence[Sequence[Record]],
    layout: SequenceLayout,
    llm: nn.Module,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every row's records moved to q_1 … q_k and laid side by side: per layer (keys, values), each
    (B, kv_heads, K * n_voco, head_dim) with K the most records of any row, and which of those columns
    are real (B, K * n_voco); a row of fewer records has masked zero columns after its last one.

    Records of any stored float dtype are cast to `dtype`; the move is computed in fp32 (or wider). The
    LLM's rotary embedding is looked up only when something moves: one record per row needs none.
    """
    batch, most = len(groups), max(len(g) for g in groups)
    work = torch.promote_types(dtype, torch.float32)
    # (B, K, layers, kv_heads, n_voco, head_dim): record slots, zero where a row has fewer records
    keys = torch.zeros(batch, most, *groups[0][0].keys.shape, dtype=work, device=device)
    values = torch.zeros_like(keys)
    for row, group in enumerate(groups):
        for slot, rec in enumerate(group):
            keys[row, slot] = rec.keys.to(device=device, dtype=work)
            values[row, slot] = rec.values.to(device=device, dtype=work)
    counts = torch.tensor([len(g) for g in groups], device=device)
    past, real = place_states(keys, values, counts, layout, llm)
    return [(k.to(dtype), v.to(dtype)) for k, v in past], real


def place_states(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    layout: SequenceLayout,
    llm: nn.Module,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The move itself, on tensors (differentiable: training runs it on voco states it backpropagates
    through). keys, values (B, K, layers, kv_heads, n_voco, head_dim): row b's images in its first
    counts[b] slots; what lies in the other slots is masked. Returns place_records' pair, in keys' dtype.
    """
    batch, most, n_layers, kv_heads, n_voco, head_dim = keys.shape
    slots = torch.arange(most, device=keys.device)
    if most > 1:
        delta = torch.tensor(slot_offsets(layout, most), device=keys.device)  # (K,): q_i - p, every row
        keys = rotate_keys(keys, delta[:, None, None, None], rotary_of(llm))  # (K, 1, 1, 1) over (B, K, ..)
    # (B, K, layers, kv_heads, n_voco, head_dim) -> (layers, B, kv_heads, K, n_voco, head_dim)
    # -> (layers, B, kv_heads, K * n_voco, head_dim): slot i's tokens at columns i * n_voco … (the order
    # of columns is not the order of positions where markers sit between slots: masks go by position)
    keys = keys.permute(2, 0, 3, 1, 4, 5).reshape(n_layers, batch, kv_heads, most * n_voco, head_dim)
    values = values.permute(2, 0, 3, 1, 4, 5).reshape(n_layers, batch, kv_heads, most * n_voco, head_dim)
    real = (slots[None] < counts.to(keys.device)[:, None]).repeat_interleave(n_voco, dim=1)  # (B, K * n_voco)
    return [(keys[i], values[i]) for i in range(n_layers)], real
