"""compress(): isolation of records from their images, identity, checkpoints and the presets."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from htcvlm.checkpoint import FORMAT, WEIGHTS_FILE, load_pretrained, save_pretrained
from htcvlm.config import HTCConfig
from htcvlm.decode import decode
from htcvlm.errors import CheckpointError, InvalidImageError
from htcvlm.generation import GenerationOptions
from htcvlm.model import HTCVLM, new_model
from htcvlm.record import image_id_of

from .helpers import QUESTIONS, make_model, png_bytes


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer, seed=3)


def test_compress_from_bytes_keys_by_sha256(model):
    images = [png_bytes(1), png_bytes(2)]
    records = model.compress(images, source_uris=["file:///a.png", "file:///b.png"])
    assert [r.image_id for r in records] == [image_id_of(b) for b in images]
    assert len(records[0].image_id) == 64
    assert records[1].source_uri == "file:///b.png"
    assert records[0].fingerprint == model.fingerprint()
    llm = model.llm.config
    assert records[0].keys.shape == (llm.num_hidden_layers, llm.num_key_value_heads, 1, model.llm_head_dim)
    assert records[0].latent.shape == (llm.hidden_size,)
    assert records[0].voco_position == model.config.n_visual == 4 + 16


def test_an_empty_batch_compresses_to_nothing(model):
    assert model.compress([]) == []


def test_a_bad_image_in_a_batch_raises_before_any_work(model):
    with pytest.raises(InvalidImageError):
        model.compress([png_bytes(1), b"not an image"])


def test_batched_compress_equals_one_by_one(model):
    images = [png_bytes(s) for s in range(3)]
    together = model.compress(images)
    for img, rec in zip(images, together, strict=True):
        alone = model.compress([img])[0]
        assert torch.allclose(alone.keys, rec.keys, atol=1e-5)
        assert torch.allclose(alone.latent, rec.latent, atol=1e-5)


def test_nothing_done_to_the_image_after_compress_changes_decode(model):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(2)])
    opts = GenerationOptions(max_new_tokens=6)
    before = decode(model, records, QUESTIONS[:2], opts)
    pixels.uniform_()  # the images change, and so would V_hy ...
    with torch.inference_mode():
        changed_v_hy = model.hybrid_tokens(pixels)
    assert changed_v_hy.abs().sum() > 0
    after = decode(model, records, QUESTIONS[:2], opts)  # ... but decoding reads only the records
    assert [a.token_ids for a in before] == [a.token_ids for a in after]


def test_decode_does_not_mutate_records(model):
    rec = model.compress([png_bytes(5)])[0]
    keys, values = rec.keys.clone(), rec.values.clone()
    decode(model, [rec, rec], QUESTIONS[:2], GenerationOptions(max_new_tokens=4))
    assert torch.equal(rec.keys, keys) and torch.equal(rec.values, values)


def test_a_different_image_changes_the_latent_and_state(model):
    a, b = model.compress([png_bytes(1), png_bytes(2)])
    assert not torch.allclose(a.latent, b.latent)
    assert not torch.allclose(a.keys, b.keys)


@pytest.mark.parametrize("channels", ["hybrid", "continuous", "discrete"])
def test_the_latent_depends_on_the_image_in_every_channel_mode(tokenizer, channels):
    """In every channel mode the latent depends on the image."""
    m = make_model(tokenizer, seed=4, channels=channels)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = m.compress_pixels(pixels, ["0" * 64])[0].latent
    shifted = m.compress_pixels(pixels.flip(-1), ["0" * 64])[0].latent
    assert not torch.allclose(base, shifted)


def test_fingerprint_tracks_weights_and_config(tokenizer):
    a, b = make_model(tokenizer, seed=1), make_model(tokenizer, seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert make_model(tokenizer, seed=2).fingerprint() != a.fingerprint()
    assert make_model(tokenizer, seed=1, n_voco=2).fingerprint() != a.fingerprint()
    with torch.no_grad():
        b.voco.add_(1e-3)
    assert b.fingerprint() != a.fingerprint()  # noticed without anyone invalidating it
    with torch.no_grad():
        b.voco.sub_(1e-3)
        b.voco.copy_(a.voco)
    assert b.fingerprint() == a.fingerprint() == a.hash_weights()
    b.load_state_dict(make_model(tokenizer, seed=4).state_dict())
    assert b.fingerprint() == make_model(tokenizer, seed=4).fingerprint()


def test_an_optimizer_step_changes_the_fingerprint(tokenizer):
    m = make_model(tokenizer, seed=1)
    before = m.fingerprint()
    m.voco.grad = torch.ones_like(m.voco)
    torch.optim.SGD([m.voco], lr=0.1).step()
    assert m.fingerprint() != before and m.fingerprint() == m.hash_weights()


def test_loading_trusts_the_stamp_only_while_the_weights_file_is_unchanged(tmp_path, model, monkeypatch):
    folder = save_pretrained(model, tmp_path / "ckpt")
    calls = []
    original = HTCVLM.hash_weights
    monkeypatch.setattr(HTCVLM, "hash_weights", lambda self: calls.append(1) or original(self))
    assert load_pretrained(folder).fingerprint() == model.fingerprint() and calls == []  # no re-hash
    # the weights rewritten behind the stamp's back: hashed again, and the new fingerprint is theirs
    other = load_pretrained(folder)
    with torch.no_grad():
        other.voco.add_(1.0)
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file(
        state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT, "fingerprint": model.fingerprint()}
    )
    calls.clear()
    reloaded = load_pretrained(folder)
    assert calls and reloaded.fingerprint() == other.hash_weights() != model.fingerprint()
    calls.clear()
    assert load_pretrained(folder).fingerprint() == reloaded.fingerprint() and calls == []  # stamped again


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, model):
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.fingerprint() == model.fingerprint()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([model.prompt_ids(QUESTIONS[0])] * 2)
    with torch.inference_mode():
        expected, _ = model(pixels, ids)
        got, _ = loaded(pixels, ids)
    assert torch.equal(expected, got)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_incomplete_checkpoint_names_the_missing_file(tmp_path, model, missing):
    folder = save_pretrained(model, tmp_path / "ckpt")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=missing):
        load_pretrained(folder)


def test_checkpoint_with_mismatched_weights(tmp_path, model, tokenizer):
    folder = save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    meta["htcvlm"]["n_voco"] = 2
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_pretrained(folder)


def test_component_dirs_must_be_complete(tmp_path, tokenizer):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    config = HTCConfig.from_name("tiny")
    with pytest.raises(CheckpointError, match=r"\*\.safetensors"):
        new_model(config.with_(vision=replace(config.vision, path=str(tmp_path / "clip"))), tokenizer)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        new_model(config.with_(llm=replace(config.llm, path=str(tmp_path))), tokenizer)


def test_paper_preset_geometry_on_meta(tokenizer):
    cfg = HTCConfig.from_name("paper")
    assert (cfg.n_patches, cfg.q_dim, cfg.n_visual) == (576, 14112, 580)
    with torch.device("meta"):
        model = new_model(cfg, tokenizer)
    assert model.layout.voco_position == 580  # the voco token right after V_hy: no text before the image
    params = sum(p.numel() for p in model.parameters())
    # LLaMA-7B without its 32000-token vocabulary (6.5 B) + CLIP ViT-L (0.3 B) + P_d (0.5 B)
    assert 7.2e9 < params < 7.4e9, params
    assert model.proj_d.w1.weight.shape == (16384, 14112)
    assert model.proj_d.w2.weight.shape == (16384, 16384)
    fp16_bytes = cfg.kv_values_per_image * 2
    assert fp16_bytes == 512 * 1024  # one voco token: 32 layers x (k, v) x 4096 values in fp16
    assert fp16_bytes * 576 == 288 * 1024**2  # what 576 image tokens would cost


def test_components_load_from_local_hugging_face_folders(tmp_path, tokenizer):
    """A CLIP vision tower and a LLaMA saved by transformers load by path, and the cache stays exact."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from htcvlm.checkpoint import from_components
    from htcvlm.config import LLMConfig, VisionConfig
    from htcvlm.decode import DecodeBatch

    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    llama.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    config = HTCConfig.from_name("tiny").with_(
        vision=VisionConfig(hidden_size=32, num_layers=2, patch_size=16, path=str(tmp_path / "clip")),
        llm=LLMConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            path=str(tmp_path / "llm"),
        ),
        pd_hidden=64,
    )
    model = from_components(config).eval()
    assert torch.equal(model.vision.embeddings.patch_embedding.weight, clip.embeddings.patch_embedding.weight)
    assert torch.equal(model.llm.lm_head.weight, llama.lm_head.weight)
    pixels = torch.rand(1, 3, 64, 64)
    records = model.compress_pixels(pixels, ["a" * 64])
    prompt = model.prompt_ids(QUESTIONS[0])
    with torch.inference_mode():
        full, _ = model(pixels, torch.tensor([prompt]))
        cached = DecodeBatch(model, records, [prompt]).row_prompt_logits(0)
    assert (full[0] - cached).abs().max() < 1e-4

    wrong = config.with_(llm=replace(config.llm, num_layers=3))
    with pytest.raises(CheckpointError, match="num_hidden_layers is 2, config says 3"):
        from_components(wrong)
