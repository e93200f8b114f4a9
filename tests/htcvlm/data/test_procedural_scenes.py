"""Scenes and their pixels: every attribute a question asks about must be readable from the image."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from htcvlm.data.dataset import ProceduralVQA
from htcvlm.data.scenes import (
    COLORS,
    GRID,
    PATTERN_RGB,
    Background,
    Scene,
    SceneObject,
    object_mask,
    render,
    sample_scene,
)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def light(pixels: np.ndarray) -> np.ndarray:
    """Pattern pixels: every channel high (no object color has all three above 200)."""
    return pixels.min(axis=-1) > 200


def texture_from_pixels(pixels: np.ndarray, inside: np.ndarray) -> str:
    """Classify an object's texture from its fully covered pixels, knowing nothing of the renderer."""
    lit = light(pixels) & inside
    if lit.sum() == 0:
        return "plain"
    # a stripe lights most of a row across the object; a row through dots stays at most half lit
    row_fractions = [lit[y][inside[y]].mean() for y in range(inside.shape[0]) if inside[y].sum() >= 4]
    return "striped" if max(row_fractions) > 0.6 else "dotted"


@pytest.fixture(scope="module")
def samples() -> list:
    data = ProceduralVQA("val", 300)
    return [data[i] for i in range(len(data))]


def test_same_scene_renders_to_identical_png_bytes() -> None:
    scene = sample_scene(random.Random(7))
    assert png_bytes(render(scene)) == png_bytes(render(sample_scene(random.Random(7))))


@pytest.mark.parametrize("image_size", [32, 64, 100, 336])
def test_image_size_is_a_parameter(image_size: int) -> None:
    image = render(sample_scene(random.Random(1)), image_size)
    assert image.mode == "RGB" and image.size == (image_size, image_size)


def test_too_small_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        render(sample_scene(random.Random(1)), 16)


def test_objects_stay_inside_the_image_and_their_cell_and_never_overlap() -> None:
    rng = random.Random(3)
    for _ in range(300):
        scene = sample_scene(rng)
        masks = [object_mask(o, 64) for o in scene.objects]
        for obj, mask in zip(scene.objects, masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert len(ys) > 0, f"{obj} drew nothing"
            cell = 64 / GRID
            # every covered pixel lies within the object's own grid cell, hence inside the image
            assert xs.min() >= int(obj.col * cell) and xs.max() < (obj.col + 1) * cell, obj
            assert ys.min() >= int(obj.row * cell) and ys.max() < (obj.row + 1) * cell, obj
        coverage = np.sum(masks, axis=0)
        assert coverage.max() <= 1.0 + 1e-6, f"objects overlap in {scene}"


def test_plain_objects_show_their_named_color(samples: list) -> None:
    checked = 0
    for sample in samples:
        pixels = np.asarray(sample.image, dtype=np.float32)
        for obj in sample.scene.objects:
            if obj.texture != "plain":
                continue
            inside = object_mask(obj, 64) >= 1.0
            mean = pixels[inside].mean(axis=0)
            nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c])))
            assert nearest == obj.color and np.abs(mean - COLORS[obj.color]).max() < 8, (obj, mean)
            checked += 1
    assert checked > 200


def test_textures_are_recognisable_from_pixels(samples: list) -> None:
    seen = {"plain": 0, "striped": 0, "dotted": 0}
    for sample in samples:
        pixels = np.asarray(sample.image)
        for obj in sample.scene.objects:
            inside = object_mask(obj, 64) >= 1.0
            assert texture_from_pixels(pixels, inside) == obj.texture, obj
            # the colored part of a textured object still shows its own color, so "what color" holds
            colored = pixels[inside & ~light(pixels)].astype(np.float32).mean(axis=0)
            nearest = min(COLORS, key=lambda c: np.linalg.norm(colored - np.array(COLORS[c])))
            assert nearest == obj.color, (obj, colored)
            seen[obj.texture] += 1
    assert min(seen.values()) > 50, seen


def test_only_large_objects_carry_a_texture() -> None:
    rng = random.Random(5)
    objects = [o for _ in range(500) for o in sample_scene(rng).objects]
    assert all(o.texture == "plain" for o in objects if o.size == "small")
    assert {o.texture for o in objects if o.size == "large"} == {"plain", "striped", "dotted"}


def test_sizes_differ_clearly_in_pixels(samples: list) -> None:
    extent = {"small": [], "large": []}
    for sample in samples:
        for obj in sample.scene.objects:
            ys, xs = np.nonzero(object_mask(obj, 64) >= 0.5)
            extent[obj.size].append(max(np.ptp(xs), np.ptp(ys)) + 1)
    assert max(extent["small"]) + 5 <= min(extent["large"]), {k: (min(v), max(v)) for k, v in extent.items()}


def test_backgrounds_are_far_from_object_colors_and_darker_than_patterns(samples: list) -> None:
    kinds = set()
    for sample in samples:
        pixels = np.asarray(sample.image, dtype=np.float32)
        covered = np.sum([object_mask(o, 64) for o in sample.scene.objects], axis=0) > 0
        background = pixels[~covered]  # (n, 3)
        for name, rgb in COLORS.items():
            distance = np.linalg.norm(background - np.array(rgb), axis=1).min()
            assert distance > 60, f"background pixel within {distance:.0f} of {name} in {sample.scene}"
        assert background.mean(axis=1).max() < np.mean(PATTERN_RGB) - 20
        kinds.add(sample.scene.background.kind)
    assert kinds == {"solid", "gradient", "noise"}


def test_invalid_scenes_are_refused_with_the_offending_value() -> None:
    background = Background("solid", ((90, 90, 90), (90, 90, 90)), True, 0)
    circle = SceneObject("circle", "red", "small", "plain", 0, (1 / 6, 1 / 6))
    with pytest.raises(ValueError, match="distinct cells"):
        Scene((circle, SceneObject("square", "blue", "small", "plain", 0, (1 / 6, 1 / 6))), background)
    with pytest.raises(ValueError, match="1 to 4 objects"):
        Scene((), background)
    with pytest.raises(ValueError, match="'pink'"):
        SceneObject("circle", "pink", "small", "plain", 0, (1 / 6, 1 / 6))
    with pytest.raises(ValueError, match="'hexagon'"):
        SceneObject("hexagon", "red", "small", "plain", 0, (1 / 6, 1 / 6))  # type: ignore[arg-type]
