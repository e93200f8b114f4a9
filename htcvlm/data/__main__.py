"""`python -m htcvlm.data --sheet sheet.png`: a contact sheet of procedural samples, to look at the data."""

from __future__ import annotations

import argparse
import logging

from PIL import Image, ImageDraw

from htcvlm.data.dataset import SPLITS, ProceduralVQA, Split

logger = logging.getLogger(__name__)


def contact_sheet(n: int = 16, split: Split = "train", image_size: int = 64, zoom: int = 4) -> Image.Image:
    """n samples of a split, each enlarged `zoom` times with its question, answer and qtype below it."""
    data = ProceduralVQA(split, n, image_size)
    cols, text_h = 4, 40
    tile = image_size * zoom
    sheet = Image.new("RGB", (cols * tile, -(-n // cols) * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        sample = data[i]
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        # NEAREST: show the model's pixels as they are, not a smoothed version of them
        sheet.paste(sample.image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 3, y + tile + 2), sample.question, fill=(0, 0, 0))
        draw.text((x + 3, y + tile + 20), f"-> {sample.answer}  [{sample.qtype}]", fill=(180, 0, 0))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a contact sheet of procedural VQA samples.")
    parser.add_argument("--sheet", required=True, help="output PNG path")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    contact_sheet(args.n, args.split, args.image_size).save(args.sheet)
    logger.info("wrote %s", args.sheet)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
