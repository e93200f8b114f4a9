"""The disentanglement attention mask M_hy of Eq. 6, as an additive float mask.

Over X = [V_hy; voco; W] (query row i, key column j):
- text never attends V_hy (the bottleneck: everything visual must pass through voco);
- inside V_hy a token attends only itself ("isolated", the paper) or causally ("causal", VoCo-LLaMA);
- voco attends all of V_hy and the voco tokens before it; text is causal over voco + text.
Allowed entries are 0 and blocked ones the dtype's minimum, the form transformers adds to attention
scores (boolean 4D masks are wrong under eager attention in transformers 5).
"""

from __future__ import annotations

import torch

from htcvlm.config import VisualAttention


def allowed_hybrid(
    n_visual: int,
    n_voco: int,
    n_text: int,
    visual_attention: VisualAttention = "isolated",
    text_attends_visual: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (L, L) matrix of M_hy, True where query i may attend key j; L = n_visual + n_voco + n_text.

    `text_attends_visual=True` gives the uncompressed upper bound (plain causal attention for text).
    """
    total = n_visual + n_voco + n_text
    allowed = torch.ones(total, total, dtype=torch.bool, device=device).tril()  # causal everywhere
    if visual_attention == "isolated":
        allowed[:n_visual, :n_visual] = torch.eye(n_visual, dtype=torch.bool, device=device)
    elif visual_attention != "causal":
        raise ValueError(f"visual_attention must be 'isolated' or 'causal', got {visual_attention!r}")
    if not text_attends_visual:
        allowed[n_visual + n_voco :, :n_visual] = False
    return allowed


def to_additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive float mask: 0 where allowed, the dtype's minimum where blocked."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def hybrid_mask(
    n_visual: int,
    n_voco: int,
    text_lengths: list[int] | torch.Tensor,
    visual_attention: VisualAttention = "isolated",
    text_attends_visual: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Additive 4D mask (B, 1, L, L) for a batch of right-padded texts of the given true lengths.

    L = n_visual + n_voco + max(text_lengths). Padding keys are blocked for every query; padding query
    rows still see V_hy/voco, so no row is fully blocked (a fully blocked softmax row gives NaN).
    """
    lengths = torch.as_tensor(text_lengths, device=device)
    n_text = int(lengths.max()) if lengths.numel() else 0
    prefix = n_visual + n_voco
    allowed = allowed_hybrid(n_visual, n_voco, n_text, visual_attention, text_attends_visual, device)
    # (B, L): key j of row b is real text, or part of the prefix
    col = torch.arange(prefix + n_text, device=device)
    real_key = (col < prefix) | ((col - prefix) < lengths[:, None])
    batched = allowed[None] & real_key[:, None, :]  # (B, L, L)
    return to_additive(batched, dtype)[:, None]  # (B, 1, L, L)
