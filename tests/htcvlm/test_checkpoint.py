"""Checkpoints at 7B's terms, on small models: sharded safetensors, loading built on the meta device in the
stored dtype, the fingerprint stamp over every file, and what `onetoken info` says of a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import htcvlm.checkpoint as checkpoint
from htcvlm.checkpoint import FORMAT, INDEX_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained
from htcvlm.config import HTCConfig
from htcvlm.errors import CheckpointError
from htcvlm.model import HTCVLM, new_model
from htcvlm.shards import parse_size, plan_shards

from .helpers import QUESTIONS, make_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer, seed=5)


def total_bytes(model: HTCVLM) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def shard_files(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))


@pytest.fixture
def sharded(tmp_path, model):
    """The model saved in about four shards."""
    return save_pretrained(model, tmp_path / "sharded", max_shard_size=total_bytes(model) // 4)


@pytest.fixture
def hash_calls(monkeypatch):
    """How often a model's weights are hashed from scratch."""
    calls = []
    original = HTCVLM.hash_weights
    monkeypatch.setattr(HTCVLM, "hash_weights", lambda self: calls.append(1) or original(self))
    return calls


def logits(model: HTCVLM) -> torch.Tensor:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([model.prompt_ids(QUESTIONS[0])] * 2)
    with torch.inference_mode():
        return model(pixels.to(model.dtype), ids)[0]


def test_shard_sizes_parse_and_never_split_a_tensor():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1000) == 1000
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigabytes")
    state = {"a": torch.zeros(10), "big": torch.zeros(100), "b": torch.zeros(5), "c": torch.zeros(5)}
    assert plan_shards(state, max_shard_size=60) == [["a"], ["big"], ["b", "c"]]


def test_a_small_shard_size_writes_shards_that_load_identically(sharded, model, tmp_path):
    files = shard_files(sharded)
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / WEIGHTS_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(
        files
    )
    assert index["metadata"]["total_size"] == total_bytes(model)
    assert index["metadata"]["fingerprint"] == model.fingerprint()

    loaded = load_pretrained(sharded)
    assert loaded.hash_weights() == loaded.fingerprint() == model.fingerprint()
    expected = model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    assert torch.equal(logits(loaded), logits(model))

    # saved again unsharded into the same folder: one file, no stale shards or index beside it
    save_pretrained(loaded, sharded)
    assert (
        (sharded / WEIGHTS_FILE).is_file()
        and not (sharded / INDEX_FILE).exists()
        and not shard_files(sharded)
    )
    assert load_pretrained(sharded).fingerprint() == model.fingerprint()


def test_a_changed_shard_is_hashed_again_an_untouched_folder_is_not(sharded, model, hash_calls):
    assert load_pretrained(sharded).fingerprint() == model.fingerprint() and hash_calls == []
    shard = sharded / shard_files(sharded)[1]
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(shard), metadata={"format": FORMAT, "fingerprint": model.fingerprint()})
    changed = load_pretrained(sharded)
    assert hash_calls == [1] and changed.fingerprint() != model.fingerprint()
    assert torch.equal(changed.state_dict()[name], tensors[name])
    hash_calls.clear()
    assert load_pretrained(sharded).fingerprint() == changed.fingerprint() and hash_calls == []  # stamped
    # the index and config.json are part of what the stamp vouches for: rewritten, they are hashed again
    for name in (INDEX_FILE, "config.json"):
        (sharded / name).write_text((sharded / name).read_text() + "\n")
        hash_calls.clear()
        assert load_pretrained(sharded).fingerprint() == changed.fingerprint() and hash_calls == [1]


def test_loaded_weights_do_not_map_the_files(sharded, model):
    """A shard overwritten in place (same inode, as `cp` does) under a loaded model changes none of its
    weights: they were read into memory of their own, not mapped from the file."""
    loaded = load_pretrained(sharded)
    for shard in shard_files(sharded):
        size = (sharded / shard).stat().st_size
        with open(sharded / shard, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\x7f" * (size - size // 2))
    expected = model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    assert loaded.hash_weights() == model.fingerprint()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_half_precision_loads_in_its_dtype_built_on_meta(tmp_path, model, tokenizer, monkeypatch, dtype):
    """A bf16 checkpoint loads as bf16 (or the dtype asked for): the model is built on the meta device and
    its parameters are the very tensors read from the files, so no fp32 copy and no random init exists."""
    bf16 = make_model(tokenizer, seed=5).to(torch.bfloat16)
    folder = save_pretrained(bf16, tmp_path / "bf16", max_shard_size=total_bytes(bf16) // 3)
    built_on, read = [], {}
    real_build, real_read = checkpoint._build_on_meta, checkpoint.read_weights

    def build(*args):
        m = real_build(*args)
        built_on.extend({t.device.type for t in [*m.parameters(), *m.buffers()]})
        return m

    def read_spy(*args):
        state, converted = real_read(*args)
        read.update(state)
        return state, converted

    monkeypatch.setattr(checkpoint, "_build_on_meta", build)
    monkeypatch.setattr(checkpoint, "read_weights", read_spy)
    loaded = load_pretrained(folder, dtype=dtype)
    assert set(built_on) == {"meta"}
    want = dtype or torch.bfloat16
    params = dict(loaded.named_parameters())
    assert {p.dtype for p in params.values()} == {want}
    assert all(p.data_ptr() == read[name].data_ptr() for name, p in params.items())  # taken over, not copied
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    fresh = dict(HTCVLM(loaded.config, tokenizer).named_buffers())
    buffers = dict(loaded.named_buffers())
    assert buffers.keys() == fresh.keys()
    for name, buffer in buffers.items():
        assert buffer.dtype == fresh[name].dtype and torch.equal(buffer, fresh[name]), name
    if dtype in (None, torch.bfloat16):
        assert loaded.fingerprint() == bf16.fingerprint()
        assert torch.equal(logits(loaded), logits(load_pretrained(folder)))
    else:  # other weights, another model: another fingerprint, stamped for fp16 loads beside bf16's
        assert loaded.fingerprint() == loaded.hash_weights() != bf16.fingerprint()
        stamp = json.loads((folder / "fingerprint.json").read_text())
        assert stamp["fingerprints"] == {"stored": bf16.fingerprint(), "float16": loaded.fingerprint()}
    assert logits(loaded).isfinite().all()


def test_every_buffer_of_the_paper_geometry_is_computed_after_a_meta_build(tokenizer):
    with torch.device("meta"):
        paper = new_model(HTCConfig.from_name("paper"), tokenizer)
    assert sorted(paper.materialize_buffers("cpu")) == sorted(name for name, _ in paper.named_buffers())
    assert paper.llm.model.rotary_emb.inv_freq.shape == (64,)  # head_dim 128
    assert torch.equal(paper.vision.embeddings.position_ids, torch.arange(577)[None])
    with torch.device("meta"):
        paper.llm.model.register_buffer("mystery", torch.zeros(3), persistent=False)
    with pytest.raises(ValueError, match=r"llm\.model\.mystery"):
        paper.materialize_buffers("cpu")


def test_missing_shard_or_bad_index_names_the_file(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    second = shard_files(sharded)[1]
    (sharded / second).rename(sharded / "moved.safetensors")
    with pytest.raises(CheckpointError, match=f"missing shard {second}"):
        load_pretrained(sharded)
    (sharded / "moved.safetensors").rename(sharded / second)
    # a tensor listed in a shard that does not hold it
    name = next(k for k, v in index["weight_map"].items() if v == second)
    (sharded / INDEX_FILE).write_text(
        json.dumps({**index, "weight_map": {**index["weight_map"], name: shard_files(sharded)[0]}})
    )
    with pytest.raises(CheckpointError, match=shard_files(sharded)[0]):
        load_pretrained(sharded)
    (sharded / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load_pretrained(sharded)
    (sharded / INDEX_FILE).write_text(json.dumps({**index, "weight_map": {name: "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_pretrained(sharded)
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    (sharded / second).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=second):
        load_pretrained(sharded)


def test_info_shows_dtype_shards_layout_and_provenance(tmp_path, tokenizer, monkeypatch, capsys):
    from llm_worker.cli import main

    bf16 = make_model(tokenizer, seed=6).to(torch.bfloat16)
    provenance = {"vision": "openai/clip-vit-large-patch14-336", "P_d": "untrained"}
    folder = save_pretrained(
        bf16, tmp_path / "m", max_shard_size=total_bytes(bf16) // 2, provenance=provenance
    )
    n_shards = len(shard_files(folder))
    params = sum(p.numel() for p in bf16.parameters())
    # the stamp vouches for the files: info reads headers and the config, and loads no weight
    monkeypatch.setattr(checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("info loaded the weights"))
    assert main(["info", "--model", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"fingerprint       {bf16.fingerprint()[:16]} (preset {bf16.config.name})"
    assert lines[2].startswith(f"weights           BF16 {params / 1e6:,.1f} M values; ")
    assert lines[2].endswith(f" in {n_shards} shards")
    assert lines[3:5] == [
        "provenance        vision: openai/clip-vit-large-patch14-336",
        "                  P_d: untrained",
    ]
    voco = bf16.layout.voco_position
    assert f"layout            shared prefix 0 tokens, voco at position {voco}, text from {voco + 1}" in lines
    kv = bf16.config.kv_values_per_image  # 3 layers x (k, v) x 2 kv heads x 16 = 192 values
    assert (
        f"cached per image  {2 * kv} B fp16, {kv + 4 * kv // 16} B int8 K/V (1 voco token) "
        "+ a 256 B fp32 latent" in lines
    )
    assert json.loads((folder / "config.json").read_text())["provenance"] == provenance


def test_provenance_must_name_parts_with_strings(tmp_path, model):
    with pytest.raises(CheckpointError, match="provenance"):
        save_pretrained(model, tmp_path / "m", provenance={"llm": 7})
    folder = save_pretrained(model, tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "provenance": ["llm"]}))
    with pytest.raises(CheckpointError, match="provenance"):
        load_pretrained(folder)
