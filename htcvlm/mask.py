"""The disentanglement attention mask M_hy of Eq. 6, as an additive float mask.

Over X = [S; V_hy; sep; voco; W] (query row i, key column j), where S is the shared prefix (the text
before the image, empty for the tiny model) and sep optional separator tokens before the voco tokens:
- text never attends V_hy or sep (the bottleneck: everything visual must pass through voco);
- text attends S, or not (VoCo-LLaMA: queries after the last voco see only keys from the first voco on);
- inside V_hy a token attends only itself ("isolated", the paper) or causally ("causal", VoCo-LLaMA),
  and S before it;
- S is causal over itself; sep and voco attend everything before them; text is causal over voco + text.
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
    *,
    n_shared: int = 0,
    n_separator: int = 0,
    text_attends_prefix: bool = True,
) -> torch.Tensor:
    """Boolean (L, L) matrix of M_hy, True where query i may attend key j;
    L = n_shared + n_visual + n_separator + n_voco + n_text.

    `text_attends_visual=True` gives the uncompressed upper bound (plain causal attention for text).
    """
    visual = slice(n_shared, n_shared + n_visual)
    voco = n_shared + n_visual + n_separator
    total = voco + n_voco + n_text
    allowed = torch.ones(total, total, dtype=torch.bool, device=device).tril()  # causal everywhere
    if visual_attention == "isolated":
        allowed[visual, visual] = torch.eye(n_visual, dtype=torch.bool, device=device)
    elif visual_attention != "causal":
        raise ValueError(f"visual_attention must be 'isolated' or 'causal', got {visual_attention!r}")
    if not text_attends_visual:
        allowed[voco + n_voco :, n_shared:voco] = False  # V_hy and the separator
        if not text_attends_prefix:
            allowed[voco + n_voco :, :n_shared] = False
    return allowed


def to_additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive float mask: 0 where allowed, the dtype's minimum where blocked."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def text_segments(
    text_lengths: list[int] | torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment index and offset in it of every text column, for texts of one or more packed segments.

    text_lengths (B,) gives each row's true length (one segment); (B, K) the lengths of K question segments
    packed one after another (0 for a row with fewer). Returns (B, T) segment index (-1 on padding) and
    (B, T) offset of the column in its segment; T is the longest row.
    """
    lengths = torch.as_tensor(text_lengths, device=device)
    if lengths.ndim == 1:
        lengths = lengths[:, None]
    ends = lengths.cumsum(dim=1)  # (B, K)
    n_text = int(ends[:, -1].max()) if ends.numel() else 0
    col = torch.arange(n_text, device=lengths.device)
    seg = (col[None, :, None] >= ends[:, None, :]).sum(dim=-1)  # (B, T): segments ended before the column
    starts = ends - lengths
    offset = col[None] - starts.gather(1, seg.clamp(max=lengths.shape[1] - 1))
    return torch.where(seg < lengths.shape[1], seg, -1), offset


def hybrid_mask(
    n_visual: int,
    n_voco: int,
    text_lengths: list[int] | torch.Tensor,
    visual_attention: VisualAttention = "isolated",
    text_attends_visual: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    *,
    n_shared: int = 0,
    n_separator: int = 0,
    text_attends_prefix: bool = True,
) -> torch.Tensor:
    """Additive 4D mask (B, 1, L, L) for a batch of right-padded texts of the given true lengths.

    text_lengths (B,), or (B, K) for K question segments per row (see text_segments): each segment sees the
    prefix as one question would and, causally, itself, never the other segments, so one pass trains K
    questions about one compressed image. L = n_shared + n_visual + n_separator + n_voco + the longest
    row. Padding keys are blocked for every query; padding query rows still see voco, so no row is fully
    blocked (a fully blocked softmax row gives NaN).
    """
    seg, _ = text_segments(text_lengths, device)
    prefix = n_shared + n_visual + n_separator + n_voco
    allowed = allowed_hybrid(
        n_visual,
        n_voco,
        seg.shape[1],
        visual_attention,
        text_attends_visual,
        device,
        n_shared=n_shared,
        n_separator=n_separator,
        text_attends_prefix=text_attends_prefix,
    )
    allowed = allowed[None].repeat(seg.shape[0], 1, 1)  # (B, L, L)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)  # (B, T, T) query, key
    allowed[:, prefix:, prefix:] &= same
    return to_additive(allowed, dtype)[:, None]  # (B, 1, L, L)
