"""Procedural scenes: 1–4 flat objects on a muted background, and their rendering with Pillow.

A `Scene` is pure data (frozen dataclasses, positions as fractions of the image side), so one scene renders
at any image size and questions are computed from it, never from pixels. The design choices keep every
attribute readable from a 64 px image:

- objects sit in distinct cells of a 3×3 grid, wholly inside their cell: they never overlap, and "where"
  and "left of" have one answer by construction (no rejection sampling needed);
- object colors are saturated and far apart; backgrounds are low-saturation mid-tones, so no background pixel
  is near any object color, and the white of the textures is lighter than any background;
- textures have a period fixed in output pixels (4 px at 64 px) and anchored to the pixel grid, so the
  supersampled stripes and dots stay crisp after the area-average downsample; a textured object keeps a rim
  of its own color so its silhouette and color survive the pattern. Only large objects carry a texture:
  a small one (≈ 10 px at 64 px) has room for one or two pattern periods, too few to tell stripes from dots.
"""

from __future__ import annotations

import colorsys
import logging
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

Shape = Literal["circle", "square", "triangle", "diamond"]
Size = Literal["small", "large"]
Texture = Literal["plain", "striped", "dotted"]
BackgroundKind = Literal["solid", "gradient", "noise"]
RGB = tuple[int, int, int]

SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[Size, ...] = ("small", "large")
TEXTURES: tuple[Texture, ...] = ("plain", "striped", "dotted")
BACKGROUND_KINDS: tuple[BackgroundKind, ...] = ("solid", "gradient", "noise")
# Saturation ≥ 0.75 and value ≥ 0.67 for every color; backgrounds stay below saturation 0.15 (see
# _muted_tone), which keeps each object color far from every background pixel.
COLORS: dict[str, RGB] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 15),
    "yellow": (240, 220, 25),
    "green": (35, 170, 60),
    "blue": (40, 90, 235),
    "purple": (150, 55, 215),
}
PATTERN_RGB: RGB = (250, 250, 250)  # stripes and dots: lighter than any background (value ≤ 0.72)

GRID = 3  # the image is a GRID × GRID board of cells, one object per cell at most
POSITIONS: tuple[str, ...] = (
    "top-left",
    "top",
    "top-right",
    "left",
    "center",
    "right",
    "bottom-left",
    "bottom",
    "bottom-right",
)  # indexed by cell = row * GRID + col
# Object extent as a fraction of the cell side: small ≈ 9.8 px and large ≈ 18.3 px at 64 px (cells are
# 21.3 px), twice the extent so the two classes never look alike whatever the shape.
DIAMETER: dict[str, float] = {"small": 0.46, "large": 0.86}
CELL_MARGIN = 0.04  # of the cell side: adjacent large objects keep a gap of ≥ 1.7 px at 64 px
MAX_OBJECTS = 4


@dataclass(frozen=True)
class SceneObject:
    """One object; `center` is (x, y) as fractions of the image side, inside cell `cell`."""

    shape: Shape
    color: str  # a key of COLORS
    size: Size
    texture: Texture
    cell: int  # row * GRID + col
    center: tuple[float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {self.texture!r}")
        if not 0 <= self.cell < GRID * GRID:
            raise ValueError(f"cell must be in [0, {GRID * GRID}), got {self.cell}")

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def radius(self) -> float:
        """Half the object's extent, as a fraction of the image side."""
        return DIAMETER[self.size] / GRID / 2


@dataclass(frozen=True)
class Background:
    kind: BackgroundKind
    colors: tuple[RGB, RGB]  # solid and noise use the first; a gradient runs from the first to the second
    horizontal: bool  # gradient direction: left → right if True, else top → bottom
    noise_seed: int  # seeds the numpy generator of the noise kind, so rendering is a pure function


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must sit in distinct cells, got cells {cells}")


def _muted_tone(rng: random.Random) -> RGB:
    """A low-saturation mid-tone: never near a saturated object color, never as light as the pattern."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.72))
    return round(r * 255), round(g * 255), round(b * 255)


def sample_background(rng: random.Random) -> Background:
    kind = rng.choice(BACKGROUND_KINDS)
    return Background(kind, (_muted_tone(rng), _muted_tone(rng)), rng.random() < 0.5, rng.getrandbits(32))


def sample_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """Draw a scene: 1–4 objects (uniform unless given) in distinct cells, with distinct colors.

    Colors are distinct within a scene so every object can be named by its color; shapes may repeat, so
    counting a shape is a real question.
    """
    n = rng.randint(1, MAX_OBJECTS) if n_objects is None else n_objects
    cells = rng.sample(range(GRID * GRID), n)
    colors = rng.sample(sorted(COLORS), n)
    objects = []
    for cell, color in zip(cells, colors, strict=True):
        size: Size = rng.choice(SIZES)
        texture: Texture = rng.choice(TEXTURES) if size == "large" else "plain"
        # jitter the center within the cell as far as the object still fits inside it with the margin
        slack = max(0.0, 0.5 - DIAMETER[size] / 2 - CELL_MARGIN) / GRID
        cx = (cell % GRID + 0.5) / GRID + rng.uniform(-slack, slack)
        cy = (cell // GRID + 0.5) / GRID + rng.uniform(-slack, slack)
        objects.append(SceneObject(rng.choice(SHAPES), color, size, texture, cell, (cx, cy)))
    return Scene(tuple(objects), sample_background(rng))


def _supersample(image_size: int) -> int:
    # 4× keeps 64 px edges clean; large images need less and 4 × 336 px would cost time for nothing
    return 4 if image_size <= 128 else 2


def pattern_period(image_size: int) -> int:
    """Texture period in output pixels: 4 px at 64 px, 21 px at 336 px."""
    return max(4, round(image_size / 16))


def _shape_points(obj: SceneObject, side: float) -> list[tuple[float, float]]:
    cx, cy = obj.center[0] * side, obj.center[1] * side
    r = obj.radius * side
    if obj.shape == "square":
        h = 0.9 * r  # a full-extent square reads much heavier than the other shapes
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if obj.shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def _canvas_box(obj: SceneObject, side: int, pad: int) -> tuple[int, int, int, int]:
    """The object's bounding box in canvas pixels, padded and clipped to the canvas."""
    cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
    return (
        max(0, int(cx - r) - pad),
        max(0, int(cy - r) - pad),
        min(side, int(cx + r) + 1 + pad),
        min(side, int(cy + r) + 1 + pad),
    )


def _draw_mask(obj: SceneObject, side: int) -> Image.Image:
    """The object's silhouette as an L mask of side × side pixels (255 inside)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if obj.shape == "circle":
        cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_shape_points(obj, side), fill=255)
    return mask


def _pattern_mask(texture: Texture, side: int, period: int) -> Image.Image:
    """Where the pattern is light, over the whole supersampled canvas; `period` in canvas pixels."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if texture == "striped":
        # horizontal stripes half a period thick, on the output pixel grid so they downsample crisply
        for y in range(period // 2, side, period):
            draw.rectangle((0, y, side - 1, y + period // 2 - 1), fill=255)
    elif texture == "dotted":
        r = 0.3 * period  # dots 0.6 period wide: 2.4 px at 64 px, still dots and not a grid of lines
        for y in range(period // 2, side, period):
            for x in range(period // 2, side, period):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return mask


def render_background(background: Background, image_size: int) -> Image.Image:
    """The background alone at output resolution (noise is per output pixel, not per canvas pixel)."""
    c0 = np.array(background.colors[0], dtype=np.float32)
    if background.kind == "gradient":
        c1 = np.array(background.colors[1], dtype=np.float32)
        t = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
        ramp = t[None, :, None] if background.horizontal else t[:, None, None]  # (1, W, 1) or (H, 1, 1)
        pixels = c0 + (c1 - c0) * ramp
        pixels = np.broadcast_to(pixels, (image_size, image_size, 3))
    else:
        pixels = np.broadcast_to(c0, (image_size, image_size, 3)).copy()
        if background.kind == "noise":
            noise = np.random.default_rng(background.noise_seed).normal(0.0, 8.0, (image_size, image_size, 1))
            pixels = pixels + noise  # (H, W, 1): luminance noise keeps the tone's low saturation
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of image_size × image_size pixels."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 px for the objects to be legible, got {image_size}")
    ss = _supersample(image_size)
    side = image_size * ss
    # NEAREST upsampling then a BOX downsample returns the background pixels exactly
    canvas = render_background(scene.background, image_size).resize((side, side), Image.Resampling.NEAREST)
    period = pattern_period(image_size) * ss
    for obj in scene.objects:
        mask = _draw_mask(obj, side)
        canvas.paste(COLORS[obj.color], (0, 0), mask)
        if obj.texture != "plain":
            # erode so a rim of the object's own color (a quarter period) keeps the silhouette; the rank
            # filter runs on the object's box only, as over the whole canvas it costs 8 ms a sample
            k = period // 4
            x0, y0, x1, y1 = _canvas_box(obj, side, pad=k + 1)  # padded: the filter replicates the edges
            inner = Image.new("L", (side, side), 0)
            inner.paste(mask.crop((x0, y0, x1, y1)).filter(ImageFilter.MinFilter(2 * k + 1)), (x0, y0))
            pattern = _pattern_mask(obj.texture, side, period)
            canvas.paste(
                PATTERN_RGB, (0, 0), Image.fromarray(np.minimum(np.asarray(inner), np.asarray(pattern)))
            )
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Coverage of the object at output resolution, (H, W) floats in [0, 1] (1 = fully inside)."""
    ss = _supersample(image_size)
    mask = _draw_mask(obj, image_size * ss).resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0
