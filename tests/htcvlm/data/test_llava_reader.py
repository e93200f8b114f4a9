"""read_llava, conversations, by_image, LlavaVQA and LlavaConversations on a small LLaVA-format file with real
PNGs in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from htcvlm.data.llava import (
    LlavaConversations,
    LlavaError,
    LlavaFormatError,
    LlavaVQA,
    MissingImageError,
    by_image,
    conversations,
    read_llava,
)


def human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


def write(tmp_path: Path, entries: object) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "coco" / "a.png")
    Image.new("L", (8, 8), 128).save(root / "coco" / "gray.png")  # not RGB on disk
    Image.new("RGBA", (8, 8), (0, 0, 255, 100)).save(root / "b.png")
    return root


ENTRIES = [
    {
        "id": "one",
        "image": "coco/a.png",
        "conversations": [human("<image>\nWhat color is the image?"), gpt("Red.")],
    },
    {
        "id": "multi",
        "image": "b.png",
        "conversations": [
            human("Describe it.\n<image>"),
            gpt("A blue square."),
            human("Is it large?"),
            gpt("No."),
            human("How many?"),
            gpt(" One. "),
        ],
    },
    {"id": "text", "conversations": [human("Hello"), gpt("Hi")]},
    {"id": 7, "image": "coco/gray.png", "conversations": [human("<image>\nGray?"), gpt("Yes")]},
]


def test_turns_become_question_answer_pairs_without_the_image_tag(tmp_path: Path, image_root: Path) -> None:
    data = read_llava(write(tmp_path, ENTRIES), image_root)
    pairs = [(t.entry_id, t.turn, t.question, t.answer) for t in data.turns]
    assert pairs == [
        ("one", 0, "What color is the image?", "Red."),
        ("multi", 0, "Describe it.", "A blue square."),
        ("multi", 1, "Is it large?", "No."),
        ("multi", 2, "How many?", "One."),
        ("7", 0, "Gray?", "Yes"),
    ]
    assert data.turns[1].image_path == image_root / "b.png"
    assert data.text_only == 1 and data.missing == ()


def test_dataset_opens_images_as_rgb(tmp_path: Path, image_root: Path) -> None:
    dataset = LlavaVQA(read_llava(write(tmp_path, ENTRIES), image_root))
    assert len(dataset) == 5
    first, gray = dataset[0], dataset[4]
    assert first.image.mode == "RGB" and first.image.size == (20, 10)
    assert first.image.getpixel((0, 0)) == (255, 0, 0)
    assert gray.image.mode == "RGB" and gray.image.getpixel((3, 3)) == (128, 128, 128)
    assert dataset[2].image.mode == "RGB"
    assert (first.question, first.answer, first.kind, first.qtype, first.scene) == (
        "What color is the image?",
        "Red.",
        None,
        "llava",
        None,
    )


def test_conversations_group_the_turns_back_and_pack_them_into_one_sample(
    tmp_path: Path, image_root: Path
) -> None:
    """Each entry's turns are one conversation, its first turn the sample's question and the later ones its
    follow-ups in order; a list cut mid-conversation (a held-out tail) starts a conversation where it
    starts."""
    turns = read_llava(write(tmp_path, ENTRIES), image_root).turns
    grouped = conversations(turns)
    assert [[(t.entry_id, t.turn) for t in c] for c in grouped] == [
        [("one", 0)],
        [("multi", 0), ("multi", 1), ("multi", 2)],
        [("7", 0)],
    ]
    assert [[t.turn for t in c] for c in conversations(turns[2:])] == [[1, 2], [0]]
    packed = LlavaConversations(by_image(grouped))[1]
    assert (packed.question, packed.answer) == ("Describe it.", "A blue square.")
    assert packed.follow_ups == (("Is it large?", "No."), ("How many?", "One.")) and packed.more == ()
    assert packed.image.mode == "RGB" and packed.image.size == (8, 8)


def test_entries_that_share_an_image_become_one_sample(tmp_path: Path, image_root: Path) -> None:
    """by_image groups the conversations about one image file in file order, wherever they stand in the
    file; the sample asks the first one's turns as question and follow-ups and each other conversation,
    whole and in order, in `more` (its own segment when packed)."""
    again = [
        {
            "id": "again",
            "image": "b.png",
            "conversations": [human("<image>\nColor?"), gpt("Blue."), human("Shape?"), gpt("Square.")],
        },
        {"id": "last", "image": "b.png", "conversations": [human("Big?\n<image>"), gpt("No.")]},
    ]
    turns = read_llava(write(tmp_path, [*ENTRIES, *again]), image_root).turns
    groups = by_image(conversations(turns))
    assert [[c[0].entry_id for c in g] for g in groups] == [["one"], ["multi", "again", "last"], ["7"]]
    sample = LlavaConversations(groups)[1]
    assert (sample.question, sample.answer) == ("Describe it.", "A blue square.")
    assert sample.follow_ups == (("Is it large?", "No."), ("How many?", "One."))
    assert sample.more == ((("Color?", "Blue."), ("Shape?", "Square.")), (("Big?", "No."),))
    assert LlavaConversations(groups)[0].more == ()


def test_missing_image_raises_a_typed_error_naming_entry_and_file(tmp_path: Path, image_root: Path) -> None:
    entries = [*ENTRIES, {"id": "gone", "image": "coco/nope.jpg", "conversations": [human("Q"), gpt("A")]}]
    with pytest.raises(MissingImageError) as info:
        read_llava(write(tmp_path, entries), image_root)
    assert info.value.entry_id == "gone" and info.value.path == image_root / "coco" / "nope.jpg"
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LlavaError)


def test_missing_images_can_be_skipped_and_are_listed(tmp_path: Path, image_root: Path) -> None:
    entries = [{"id": "gone", "image": "coco/nope.jpg", "conversations": [human("Q"), gpt("A")]}, *ENTRIES]
    data = read_llava(write(tmp_path, entries), image_root, on_missing="skip")
    assert data.missing == ("coco/nope.jpg",)
    assert [t.entry_id for t in data.turns] == ["one", "multi", "multi", "multi", "7"]


def test_wrong_image_root_fails_on_the_first_entry(tmp_path: Path, image_root: Path) -> None:
    with pytest.raises(MissingImageError, match="'one'"):
        read_llava(write(tmp_path, ENTRIES), tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"id": "x"}, "JSON list"),
        ([["not", "an", "object"]], "entry 0 is a list"),
        ([{"id": "odd", "image": "b.png", "conversations": [human("Q")]}], "'odd'.*pairs"),
        ([{"id": "empty", "image": "b.png", "conversations": []}], "'empty'.*pairs"),
        ([{"id": "swap", "image": "b.png", "conversations": [gpt("A"), human("Q")]}], "'swap'.*'human'"),
        (
            [{"id": "multi", "image": ["a.png", "b.png"], "conversations": [human("Q"), gpt("A")]}],
            "one relative",
        ),
        (
            [{"id": "num", "image": "b.png", "conversations": [human("Q"), {"from": "gpt", "value": 3}]}],
            "string",
        ),
    ],
)
def test_malformed_files_raise_format_errors_naming_the_entry(
    tmp_path: Path, image_root: Path, entries: object, match: str
) -> None:
    with pytest.raises(LlavaFormatError, match=match):
        read_llava(write(tmp_path, entries), image_root)


def test_invalid_json_and_bad_mode_are_refused(tmp_path: Path, image_root: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1,', encoding="utf-8")
    with pytest.raises(LlavaFormatError, match="not valid JSON"):
        read_llava(path, image_root)
    with pytest.raises(ValueError, match="on_missing"):
        read_llava(write(tmp_path, ENTRIES), image_root, on_missing="ignore")  # type: ignore[arg-type]
