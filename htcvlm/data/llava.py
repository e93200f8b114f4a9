"""A reader for LLaVA-format instruction data, so the trainer runs on real images on GPU hosts.

The format (LLaVA-Instruct, llava_v1_5_mix665k) is one JSON list of entries:

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

Each human/gpt pair becomes one `LlavaTurn` with the `<image>` tag removed, listed in conversation order.
`conversations()` groups them back into dialogues, and `by_image()` groups the dialogues that share one
image file (the mix665k asks about many COCO images in several entries): training packs every conversation
about an image after one compressed prefix, each its own segment, each turn reading the turns of its
conversation before it (`LlavaConversations`); `LlavaVQA` gives every turn alone, as the service asks
questions (validation).

Failures, all `LlavaError`s, which the trainer's entry point catches to report a bad data set:
- `LlavaFormatError`: the file is not JSON, or an entry is not of the shape above (the entry is named);
- `MissingImageError`: an entry's image file does not exist, with on_missing="raise" (the default, since a
  missing file usually means a wrong image_root); with on_missing="skip" the entry is left out and its path
  listed in `LlavaData.missing`, so the caller can log how many were lost.
Entries without an "image" key (text-only instructions in the LLaVA mix) are skipped and counted, not errors:
this model answers questions about images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from htcvlm.data.dataset import VQASample

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"


class LlavaError(Exception):
    """Base of the reader's errors; caught at the trainer's entry point, never retried."""


class LlavaFormatError(LlavaError):
    """The JSON is not a list of LLaVA entries; the message names the offending entry."""


class MissingImageError(LlavaError, FileNotFoundError):
    """An entry's image file is not under image_root (on_missing="raise")."""

    def __init__(self, entry_id: str, path: Path) -> None:
        super().__init__(f"entry {entry_id!r}: image file {str(path)!r} does not exist")
        self.entry_id = entry_id
        self.path = path


@dataclass(frozen=True)
class LlavaTurn:
    """One question and its answer about one image; the image is opened only when used."""

    entry_id: str
    image_path: Path  # image_root / the entry's "image"
    turn: int  # 0 for the first human/gpt pair of the conversation
    question: str  # without the <image> tag
    answer: str


@dataclass(frozen=True)
class LlavaData:
    turns: tuple[LlavaTurn, ...]
    missing: tuple[str, ...] = ()  # "image" values of entries skipped for a missing file
    text_only: int = 0  # entries skipped for having no image


def strip_image_tag(text: str) -> str:
    """The text without its <image> tag(s) and the line breaks around them."""
    return text.replace(IMAGE_TAG, "").strip()


def _turns_of(entry: Any, position: int, image_root: Path) -> list[LlavaTurn]:
    if not isinstance(entry, dict):
        raise LlavaFormatError(f"entry {position} is a {type(entry).__name__}, not an object")
    entry_id = str(entry.get("id", position))
    image, conversations = entry.get("image"), entry.get("conversations")
    if not isinstance(image, str) or not image:
        raise LlavaFormatError(f"entry {entry_id!r}: 'image' must be one relative path, got {image!r}")
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        raise LlavaFormatError(
            f"entry {entry_id!r}: 'conversations' must be a non-empty list of human/gpt pairs, "
            f"got {conversations!r:.200}"
        )
    turns = []
    for turn in range(len(conversations) // 2):
        human, gpt = conversations[2 * turn], conversations[2 * turn + 1]
        for message, speaker in ((human, "human"), (gpt, "gpt")):
            if not isinstance(message, dict) or message.get("from") != speaker:
                raise LlavaFormatError(
                    f"entry {entry_id!r}: message {2 * turn + (speaker == 'gpt')} must come from "
                    f"{speaker!r}, got {message!r:.200}"
                )
            if not isinstance(message.get("value"), str):
                raise LlavaFormatError(f"entry {entry_id!r}: a message's 'value' must be a string")
        turns.append(
            LlavaTurn(
                entry_id, image_root / image, turn, strip_image_tag(human["value"]), gpt["value"].strip()
            )
        )
    return turns


def read_llava(
    json_path: str | Path, image_root: str | Path, *, on_missing: Literal["raise", "skip"] = "raise"
) -> LlavaData:
    """Every (question, answer) pair of a LLaVA-format JSON file, images resolved under image_root.

    Image files are checked to exist (one stat each) but not opened. Raises LlavaFormatError on a malformed
    file and, with on_missing="raise", MissingImageError on the first missing image.
    """
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    json_path, image_root = Path(json_path), Path(image_root)
    try:
        with json_path.open(encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise LlavaFormatError(f"{json_path} is not valid JSON: {e}") from e
    if not isinstance(entries, list):
        raise LlavaFormatError(
            f"{json_path} must hold a JSON list of entries, got a {type(entries).__name__}"
        )
    turns: list[LlavaTurn] = []
    missing: list[str] = []
    text_only = 0
    for position, entry in enumerate(entries):
        if isinstance(entry, dict) and "image" not in entry:
            text_only += 1
            continue
        entry_turns = _turns_of(entry, position, image_root)
        path = entry_turns[0].image_path
        if not path.is_file():
            if on_missing == "raise":
                raise MissingImageError(entry_turns[0].entry_id, path)
            missing.append(entry["image"])
            continue
        turns.extend(entry_turns)
    if missing or text_only:
        logger.warning(
            "%s: skipped %d entries with a missing image and %d without an image",
            json_path,
            len(missing),
            text_only,
        )
    return LlavaData(tuple(turns), tuple(missing), text_only)


Conversation = tuple[LlavaTurn, ...]  # one entry's turns in order, one image
ImageConversations = tuple[Conversation, ...]  # every conversation about one image, in file order


def conversations(turns: Sequence[LlavaTurn]) -> tuple[Conversation, ...]:
    """read_llava()'s turns grouped back into their conversations: a new one starts at each turn 0 (and
    at the first turn of a list cut mid-conversation, as a held-out tail cuts it)."""
    grouped: list[list[LlavaTurn]] = []
    for turn in turns:
        if not grouped or turn.turn == 0 or turn.image_path != grouped[-1][-1].image_path:
            grouped.append([])
        grouped[-1].append(turn)
    return tuple(tuple(g) for g in grouped)


def by_image(items: Sequence[Conversation]) -> tuple[ImageConversations, ...]:
    """Conversations grouped by their image file, each group in file order and the groups in the order of
    their first conversation: one compressed prefix serves them all."""
    groups: dict[Path, list[Conversation]] = {}
    for conversation in items:
        groups.setdefault(conversation[0].image_path, []).append(conversation)
    return tuple(tuple(g) for g in groups.values())


def image_path(group: ImageConversations) -> Path:
    """The one image file a `by_image` group's conversations are about."""
    return group[0][0].image_path


def image_sample(group: Sequence[Conversation], image: Image.Image) -> VQASample:
    """Conversations about `image` as one sample: the first one's first turn, its later turns as
    `follow_ups`, and each further conversation in `more`, its own segment."""
    (first, *later), *others = group
    return VQASample(
        image=image,
        question=first.question,
        answer=first.answer,
        kind=None,
        qtype="llava",
        follow_ups=tuple((t.question, t.answer) for t in later),
        more=tuple(tuple((t.question, t.answer) for t in c) for c in others),
    )


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # convert() loads the pixels, so the file can close here


class LlavaVQA:
    """Map-style dataset over read_llava()'s turns, each alone: opens the image as RGB on each access."""

    def __init__(self, data: LlavaData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.turns)

    def __getitem__(self, index: int) -> VQASample:
        turn = self.data.turns[index]
        return image_sample(((turn,),), open_rgb(turn.image_path))


class LlavaConversations:
    """Map-style dataset over images: one sample per `by_image` group, every conversation about the image
    packed (see `image_sample`); opens the image as RGB on each access."""

    def __init__(self, items: Sequence[ImageConversations]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> VQASample:
        group = self.items[index]
        return image_sample(group, open_rgb(image_path(group)))
