"""LLaVA-1.5 in both published formats reads into one OneToken model that computes what LLaVA computes."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import skimage.data
import torch
from PIL import Image
from transformers import LlavaImageProcessorPil

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.errors import CheckpointError
from htcvlm.formats.llava import ImportedModel, detect_format, read_llava
from htcvlm.formats.weights import load_weights_file
from htcvlm.images import pixels_from_bytes
from htcvlm.model import HTCVLM
from tests.htcvlm.formats.published import IMAGE_SIZE, Published, publish, write_shards

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
STRINGS = [
    " USER: ",
    "\n",
    "ASSISTANT:",
    "USER: What is in the image?\nASSISTANT:",
    "Über naïve 東京 😀",
    "  2 cats",
]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    return publish(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def imported(published) -> ImportedModel:
    return read_llava(published.original, published.clip)


def build(imported: ImportedModel) -> HTCVLM:
    model = HTCVLM(imported.config, imported.tokenizer)
    model.load_state_dict(imported.state, strict=True)
    return model.eval()


def photo_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_formats_are_told_apart(published, tmp_path):
    assert detect_format(published.original) == "llava"
    assert detect_format(published.hf) == "llava-hf"
    with pytest.raises(CheckpointError, match="neither LLaVA's original format"):
        detect_format(published.clip)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        detect_format(tmp_path)


def test_both_formats_read_the_same(published, imported):
    hf = read_llava(published.hf)
    assert hf.config == imported.config
    cfg = imported.config
    assert (cfg.channels, cfg.projector, cfg.vision.select_layer, cfg.image_size) == (
        "continuous",
        "mlp2x_gelu",
        -2,
        IMAGE_SIZE,
    )
    assert cfg.preprocess.pad_to_square and cfg.preprocess.pad_colour == (122, 116, 104)
    assert cfg.llm.vocab_size == 400 and cfg.llm.rms_norm_eps == 1e-5
    assert hf.state.keys() == imported.state.keys()
    for key, tensor in imported.state.items():
        assert torch.equal(hf.state[key], tensor), key
    # the vocabulary is the sentencepiece model's: llava-hf's <image>, <pad> and padding rows are left out
    assert imported.state["llm.model.embed_tokens.weight"].shape[0] == 400
    assert hf.tokenizer.get_vocab() == imported.tokenizer.get_vocab()
    for text in STRINGS:
        assert hf.tokenizer(text).input_ids == imported.tokenizer(text).input_ids, text
    assert imported.tokenizer.pad_token == "<unk>" and len(imported.tokenizer) == 400


def test_transformers_own_save_reads_the_same(published, imported, tmp_path):
    """transformers 5 saves llava-hf under other key names (no vision_model.); they read the same."""
    folder = tmp_path / "resaved"
    published.model.save_pretrained(folder)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(published.hf / name, folder / name)
    resaved = read_llava(folder)
    assert resaved.config == imported.config
    assert all(torch.equal(resaved.state[k], v) for k, v in imported.state.items())


def test_loads_strictly_and_image_features_equal_transformers(published, imported):
    """HTCVLM's continuous channel (tower's penultimate layer, patch tokens, projector) on our preprocessed
    image equals LlavaForConditionalGeneration.get_image_features on transformers' own preprocessing."""
    model = build(imported)
    processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    for array in (skimage.data.chelsea(), skimage.data.camera(), skimage.data.rocket()[:, 100:400]):
        pixels = pixels_from_bytes(photo_bytes(array), IMAGE_SIZE, processing=imported.config.preprocess)
        reference_pixels = processor(Image.fromarray(array), return_tensors="pt").pixel_values
        assert torch.equal(model.vision_input(pixels[None]), reference_pixels)
        with torch.no_grad():
            ours = model.continuous_tokens(pixels[None])
            theirs = published.model.get_image_features(pixel_values=reference_pixels).pooler_output[0]
        assert ours.shape == (1, (IMAGE_SIZE // 8) ** 2, 64)
        torch.testing.assert_close(ours[0], theirs, rtol=0, atol=1e-5)


def test_llava_prompt_logits_equal_transformers(published, imported):
    """LLaVA-1.5's whole pass, [BOS, system, " USER: "] · image features · "\\n{q} ASSISTANT:" with plain
    causal attention, from HTCVLM's parts equals LlavaForConditionalGeneration's logits (fp32)."""
    model = build(imported)
    tokenizer = imported.tokenizer
    pixels = pixels_from_bytes(
        photo_bytes(skimage.data.coffee()), IMAGE_SIZE, processing=imported.config.preprocess
    )
    # as LLaVA's tokenizer_image_token: the text on each side of <image> tokenized on its own
    before = tokenizer(f"{SYSTEM} USER: ").input_ids
    after = tokenizer("\nWhat is in the image? ASSISTANT:", add_special_tokens=False).input_ids
    n_patches = imported.config.n_patches
    ids = torch.tensor([before + [published.model.config.image_token_id] * n_patches + after])
    with torch.no_grad():
        theirs = published.model(input_ids=ids, pixel_values=model.vision_input(pixels[None])).logits
        embeds = torch.cat(
            [
                model.embed_text(torch.tensor([before])),
                model.continuous_tokens(pixels[None]),
                model.embed_text(torch.tensor([after])),
            ],
            dim=1,
        )
        ours = model.llm(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, theirs[..., : len(tokenizer)], rtol=0, atol=1e-5)


def test_llm_weights_are_llavas(published, imported):
    """The language model is LLaVA's: the same logits for the same token ids (text only)."""
    model = build(imported)
    ids = torch.tensor([imported.tokenizer("USER: What is in the image?\nASSISTANT:").input_ids])
    with torch.no_grad():
        ours = model.llm(input_ids=ids).logits
        theirs = published.model(input_ids=ids).logits[..., :400]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_saved_as_onetoken_checkpoint(imported, tmp_path):
    """A read LLaVA saves and loads as a OneToken checkpoint, its preprocessing and tokenizer kept."""
    model = build(imported)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "onetoken"))
    assert loaded.config == imported.config
    assert loaded.fingerprint() == model.fingerprint()
    for text in STRINGS:
        assert loaded.tokenizer(text).input_ids == imported.tokenizer(text).input_ids


def test_original_format_needs_its_clip_folder(published):
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14-336"):
        read_llava(published.original)
    with pytest.raises(CheckpointError, match="holds its own vision tower"):
        read_llava(published.hf, published.clip)


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def test_unexpected_weight_is_named(published, tmp_path):
    folder = copy_of(published.original, tmp_path)
    state = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state |= load_weights_file(shard)
        shard.unlink()
    state["model.image_newline"] = torch.zeros(64)  # LLaVA-NeXT's, not LLaVA-1.5's
    write_shards(folder, state, "bin")
    with pytest.raises(CheckpointError, match=r"unexpected weights: model\.image_newline$"):
        read_llava(folder, published.clip)
    # a weight under a known prefix that the model has not got is named too
    state["model.layers.0.self_attn.rotary_emb.inv_freq_typo"] = torch.zeros(2)
    del state["model.image_newline"]
    write_shards(folder, state, "bin")
    with pytest.raises(CheckpointError, match=r"not in the model \['llm\.model\.layers\.0\.self_attn"):
        read_llava(folder, published.clip)


def test_missing_weight_is_named(published, tmp_path):
    folder = copy_of(published.hf, tmp_path)
    state = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        state |= load_weights_file(shard)
        shard.unlink()
    del state["multi_modal_projector.linear_2.bias"]
    write_shards(folder, state, "safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['proj_v\.2\.bias'\]"):
        read_llava(folder)


def test_unsupported_settings_are_refused(published, tmp_path):
    folder = copy_of(published.original, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for change, message in [
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
        ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size 1024"),
        ({"vocab_size": 401}, "vocab_size is 401 but tokenizer.model has 400"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
    ]:
        (folder / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=message):
            read_llava(folder, published.clip)


def test_hf_tokens_added_beyond_image_and_pad_are_refused(published, tmp_path):
    folder = copy_of(published.hf, tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][-1], "id": 402, "content": "<im_start>"})
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="<im_start>"):
        read_llava(folder)


def test_hf_padding_follows_an_explicit_do_pad(published, tmp_path):
    """llava-hf's CLIPImageProcessor config cannot say LLaVA-1.5 pads (it is taken to); do_pad false can."""
    folder = copy_of(published.hf, tmp_path)
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"do_pad": False}))
    assert not read_llava(folder).config.preprocess.pad_to_square
    path.unlink()
    assert read_llava(folder).config.preprocess.pad_to_square


def test_preprocessing_other_than_clips_is_refused(published, tmp_path):
    clip = copy_of(published.clip, tmp_path)
    path = clip / "preprocessor_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"resample": 2, "size": 64}))
    with pytest.raises(CheckpointError, match=r"resample is 2, not bicubic.*size is 64"):
        read_llava(published.original, clip)


def test_config_transformers_refuses_is_a_checkpoint_error(published, tmp_path):
    folder = copy_of(published.hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 5  # 32 is not a multiple of 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="transformers refuses its LlavaConfig"):
        read_llava(folder)
