"""Converted published checkpoints through the real service: `onetoken convert`, `onetoken ingest` into the
embedded store, then Ask and Search over gRPC from a server that loads the converted folder.

The weights are random (tiny LLaVA-1.5 geometry in its published layouts), so answers mean nothing: what is
checked is that they come back, stop at EOS or the token limit, are the converted model's own answers
(decoded in this process from its own records), and that Search finds each image first.
"""

from __future__ import annotations

import pytest
import skimage.data
import torch
from safetensors.torch import load_file

from cache.keys import DEFAULT_PREFIX
from htcvlm.checkpoint import load_pretrained
from htcvlm.decode import decode
from htcvlm.generation import GenerationOptions
from htcvlm.record import image_id_of
from llm_worker.cli import main
from llm_worker.client import OneTokenClient
from tests.e2e.conftest import ServerThread, worker_config
from tests.encoder_service.helpers import png
from tests.htcvlm.formats.published import publish, write_voco_llama
from tests.htcvlm.formats.test_convert import photo
from tests.htcvlm.formats.test_mgvq import GOLDEN

MAX_NEW_TOKENS = 6
OPTIONS = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    """`onetoken convert` arguments of each converted model, its --out left to the test."""
    root = tmp_path_factory.mktemp("published")
    published = publish(root)
    state = {k.removeprefix("state."): v.float() for k, v in load_file(str(GOLDEN)).items() if "state." in k}
    mgvq = root / "mgvq_f16c32_g8.pt"
    torch.save({"model": state}, mgvq)
    voco = write_voco_llama(root / "voco-llama", published.original, 400)
    return {
        "llava-hybrid": ["llava", str(published.hf), "--mgvq", str(mgvq), "--pd-hidden", "64"],
        "voco-llama": ["voco-llama", str(voco), "--clip", str(published.clip)],
    }


@pytest.mark.parametrize("name", ["llava-hybrid", "voco-llama"])
def test_a_converted_model_ingests_answers_and_searches(name, sources, tmp_path, ray_cluster, capsys):
    model = tmp_path / "model"
    assert main(["convert", *sources[name], "--out", str(model), "--dtype", "fp32"]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    images = [png(i, size=40) for i in range(3)] + [photo(skimage.data.chelsea())]
    for i, data in enumerate(images):
        (corpus / f"{i}.png").write_bytes(data)
    store, index = tmp_path / "records", tmp_path / "index"
    args = ["ingest", str(corpus), "--model", str(model), "--store", str(store), "--index-dir", str(index)]
    assert main([*args, "--kv-dtype", "fp32"]) == 0
    assert "encoded 4, already cached 0, failed 0" in capsys.readouterr().out

    loaded = load_pretrained(model)
    expected = decode(loaded, loaded.compress(images), ["What is in the image?"] * len(images), OPTIONS)
    server = ServerThread(worker_config(model, str(store), tmp_path / "worker-index", DEFAULT_PREFIX))
    try:
        with OneTokenClient(server.address, timeout_s=60) as client:
            generated = 0
            for data, own in zip(images, expected, strict=True):
                image_id = image_id_of(data)  # stored by ingest: no EncodeImage here
                answer = client.ask("What is in the image?", image_id=image_id, max_new_tokens=MAX_NEW_TOKENS)
                assert answer.image_id == image_id
                n = len(answer.token_ids)
                assert (answer.finish_reason, n == MAX_NEW_TOKENS) in (("length", True), ("eos", False))
                assert answer.usage.completion_tokens == n
                assert list(answer.token_ids) == own.token_ids  # the converted model's own answer
                generated += n
                hits = client.search(k=4, image_id=image_id).hits
                assert hits[0].image_id == image_id and hits[0].score == pytest.approx(1.0, abs=1e-4)
                assert {h.image_id for h in hits} == {image_id_of(d) for d in images}
            assert generated > 0
    finally:
        server.stop()
