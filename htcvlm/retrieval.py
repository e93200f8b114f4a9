"""Near-duplicate retrieval over voco latents: do augmented copies find their original?

Each original image is compressed once; each augmented copy (crop, resize, color jitter, JPEG
re-encoding) is compressed and its latent searched, by cosine similarity, among the originals' latents.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from htcvlm.images import to_pixels, to_rgb
from htcvlm.model import HTCVLM

Augment = Callable[[Image.Image, random.Random], Image.Image]


def crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """Keep 80-90% of each side, at a random offset."""
    w, h = img.size
    keep = rng.uniform(0.8, 0.9)
    cw, ch = int(w * keep), int(h * keep)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def resize(img: Image.Image, rng: random.Random) -> Image.Image:
    """Down to 50-75% and back: the detail a thumbnail loses."""
    w, h = img.size
    scale = rng.uniform(0.5, 0.75)
    small = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


def color_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each by up to ±20%."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(0.8, 1.2))
    return img


def jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    """Re-encode as JPEG at quality 30-70."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(30, 70))
    return to_rgb(Image.open(io.BytesIO(buf.getvalue())))


AUGMENTATIONS: dict[str, Augment] = {
    "crop": crop,
    "resize": resize,
    "color_jitter": color_jitter,
    "jpeg": jpeg,
}


@torch.inference_mode()
def latents(model: HTCVLM, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """(N, d) L2-normalized voco latents, through compress_pixels (the cached path)."""
    out = []
    size = model.config.image_size
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([to_pixels(to_rgb(img), size) for img in chunk]).to(model.device)
        records = model.compress_pixels(pixels, [f"{start + i:064x}" for i in range(len(chunk))])
        out.append(torch.stack([r.latent for r in records]))
    return F.normalize(torch.cat(out), dim=-1)


def near_duplicate_recall(
    model: HTCVLM, originals: Sequence[Image.Image], seed: int = 0, ks: Sequence[int] = (1, 10)
) -> dict[str, dict[str, float]]:
    """recall@k per augmentation and overall: the share of copies whose original ranks in the top k."""
    rng = random.Random(seed)
    base = latents(model, originals)
    results: dict[str, dict[str, float]] = {}
    all_ranks, all_copies = [], []
    for name, augment in AUGMENTATIONS.items():
        copies = latents(model, [augment(img, rng) for img in originals])
        all_copies.append(copies)
        sims = copies @ base.T  # (N copies, N originals), cosine
        own = sims.diagonal()[:, None]
        ranks = (sims > own).sum(dim=1)  # 0 when the original is the best match
        all_ranks.append(ranks)
        results[name] = {f"recall@{k}": float((ranks < k).float().mean()) for k in ks}
    ranks = torch.cat(all_ranks)
    results["all"] = {f"recall@{k}": float((ranks < k).float().mean()) for k in ks}
    results["pooled"] = pooled_recall(base, all_copies, ks)
    return results


def pooled_recall(
    base: torch.Tensor, copies: Sequence[torch.Tensor], ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """Every original and every copy indexed together, each copy searched among all of them but itself:
    recall@k is the share of copies with an image of the same source in their top k (another copy
    counts, as it would in a search). Also the cosine between distinct originals (mean and max): how
    far apart unrelated images lie, which a threshold on the score needs."""
    n = len(base)
    index = torch.cat([base, *copies])  # (N * (1 + A), d): source of row r is r % N
    source = torch.arange(len(index)) % n
    queries = torch.arange(n, len(index))
    sims = index[queries] @ index.T
    sims[torch.arange(len(queries)), queries] = -torch.inf  # the query itself is not a hit
    top = sims.topk(min(max(ks), len(index) - 1), dim=1).indices  # (Q, max k), itself never in it
    same = source[top] == source[queries][:, None]
    out = {f"recall@{k}": float(same[:, :k].any(dim=1).float().mean()) for k in ks}
    between = (base @ base.T)[~torch.eye(n, dtype=torch.bool)]
    return out | {"cos_mean": float(between.mean()), "cos_max": float(between.max())}


def skimage_photos() -> list[Image.Image]:
    """The distinct real photographs shipped inside scikit-image's wheel (no download), as RGB: 25 of its
    26 files, since chessboard_GRAY.png and chessboard_RGB.png hold the same picture (a search that
    finds one from the other is right, and would count as a miss between different sources)."""
    try:
        import skimage.data
    except ImportError as exc:
        raise RuntimeError("the real-photo set needs scikit-image: pip install 'onetoken[dev]'") from exc
    folder = Path(skimage.data.__file__).parent
    files = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    photos: dict[bytes, Image.Image] = {}
    for path in files:
        photo = to_rgb(Image.open(path))
        photos.setdefault(photo.tobytes(), photo)  # the first file of each picture
    return list(photos.values())


def format_recall(name: str, results: dict[str, dict[str, float]]) -> str:
    lines = [f"{name}", f"{'augmentation':<14}" + "".join(f"{k:>12}" for k in results["all"])]
    for aug, scores in results.items():
        if aug != "pooled":
            lines.append(f"{aug:<14}" + "".join(f"{v:>12.3f}" for v in scores.values()))
    pooled = results["pooled"]
    lines.append(
        "pooled (originals and copies indexed together, same source counts): "
        + ", ".join(f"{k} {v:.3f}" for k, v in pooled.items() if k.startswith("recall"))
        + f"; cosine between distinct originals: mean {pooled['cos_mean']:.4f}, max {pooled['cos_max']:.4f}"
    )
    return "\n".join(lines)
