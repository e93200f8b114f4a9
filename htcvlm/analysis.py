"""Where the voco token looks: its attention over the N_d discrete tokens and the first patch tokens.

Like the paper's Figure 3: one row per image, columns the N_d anchors then the first 12 patch tokens;
attention averaged over heads and layers, each row normalised over the shown columns.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from htcvlm.model import HTCVLM

# A perceptually ordered ramp (dark blue -> teal -> yellow), enough for a heatmap without matplotlib.
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


@torch.inference_mode()
def voco_attention(model: HTCVLM, pixels: torch.Tensor, n_patches_shown: int = 12) -> torch.Tensor:
    """(B, n_discrete + n_patches_shown): the first voco token's attention, mean over layers and heads."""
    cfg, layout = model.config, model.layout
    if cfg.channels != "hybrid" or cfg.fusion != "pre":
        raise ValueError("the anchor/patch heatmap needs the hybrid model with pre-fusion")
    previous = model.llm.config._attn_implementation
    model.llm.set_attn_implementation("eager")  # only eager attention returns its weights
    try:
        prefix, _ = model.prefix_embeds(pixels.to(model.device))
        mask = layout.mask([0] * len(pixels), dtype=prefix.dtype, device=model.device)
        out = model.llm.model(inputs_embeds=prefix, attention_mask=mask, output_attentions=True)
    finally:
        model.llm.set_attn_implementation(previous)
    # each layer: (B, heads, L, L); the voco row over the visual columns
    visual = slice(layout.n_shared, layout.n_shared + cfg.n_visual)
    attn = torch.stack([a[:, :, layout.voco_position, visual] for a in out.attentions]).mean(dim=(0, 2))
    shown = attn[:, : cfg.n_discrete + n_patches_shown]
    return shown / shown.sum(dim=1, keepdim=True)


def _color(value: float) -> tuple[int, int, int]:
    x = min(max(value, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    t = x - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * t) for c in range(3))  # type: ignore[return-value]


def heatmap(weights: torch.Tensor, n_discrete: int, cell: int = 28) -> Image.Image:
    """A PNG-ready heatmap: rows are images, columns D1..D{n} then P1..P{k}, brighter = more attention."""
    rows, cols = weights.shape
    top, left = 22, 34
    img = Image.new("RGB", (left + cols * cell + 4, top + rows * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    scale = float(weights.max()) or 1.0
    for c in range(cols):
        label = f"D{c + 1}" if c < n_discrete else f"P{c - n_discrete + 1}"
        draw.text((left + c * cell + 4, 4), label, fill="black")
    for r in range(rows):
        draw.text((4, top + r * cell + 8), f"{r + 1}", fill="black")
        for c in range(cols):
            x, y = left + c * cell, top + r * cell
            draw.rectangle((x, y, x + cell - 2, y + cell - 2), fill=_color(float(weights[r, c]) / scale))
    return img
