"""Published weight files: shards honour their index, pickles only load as plain tensors, keys map or fail."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from htcvlm.errors import CheckpointError
from htcvlm.formats.weights import load_weights, load_weights_file, rename_keys
from tests.htcvlm.formats.published import write_shards

STATE = {f"w{i}": torch.full((2,), float(i)) for i in range(5)}


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_weights_load_whole(tmp_path, kind):
    write_shards(tmp_path, STATE, kind, n=3)
    state = load_weights(tmp_path)
    assert state.keys() == STATE.keys() and all(torch.equal(state[k], v) for k, v in STATE.items())


def test_index_and_shards_must_agree(tmp_path):
    write_shards(tmp_path, STATE, "bin", n=2)
    index = tmp_path / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["w9"] = data["weight_map"]["w0"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lacks keys its index assigns to it: w9"):
        load_weights(tmp_path)
    del data["weight_map"]["w9"], data["weight_map"]["w2"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="holds keys its index does not list: w2"):
        load_weights(tmp_path)
    data["weight_map"]["w2"] = "../elsewhere.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a file in"):
        load_weights(tmp_path)


class Payload:
    """Any object a pickle could build: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_load_only_tensors(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with path.open("wb") as f:
        pickle.dump({"w": Payload()}, f, protocol=2)  # torch.save's protocol
    with pytest.raises(CheckpointError, match="not a plain PyTorch weights file"):
        load_weights_file(path)
    torch.save({"w": torch.zeros(1), "step": 3}, path)
    with pytest.raises(CheckpointError, match="flat dict of tensors"):
        load_weights_file(path)


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_weights(tmp_path)


def test_rename_keys():
    state = {"a.x": torch.zeros(1), "a.y": torch.zeros(1), "skip.me": torch.zeros(1)}
    out = rename_keys(state, [(r"a\.(.+)", r"b.\1")], [r"skip\..+"], "src")
    assert sorted(out) == ["b.x", "b.y"]
    with pytest.raises(CheckpointError, match=r"src has unexpected weights: skip\.me"):
        rename_keys(state, [(r"a\.(.+)", r"b.\1")], [], "src")
    with pytest.raises(CheckpointError, match="two weights map to b"):
        rename_keys(state, [(r"a\..+", "b")], [r"skip\..+"], "src")
