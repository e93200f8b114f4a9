"""`onetoken convert` as a user runs it: its help, what it prints, and a bad source as bad usage (exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from htcvlm.checkpoint import load_pretrained
from htcvlm.cli import DTYPE_NAMES
from htcvlm.formats.convert import DTYPES
from llm_worker.cli import main
from tests.htcvlm.formats.published import Published, publish, write_voco_llama
from tests.htcvlm.formats.test_mgvq import GOLDEN
from tests.llm_worker.helpers import onetoken


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    return publish(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def mgvq_pt(tmp_path_factory) -> Path:
    """The published-layout MGVQ test weights as the `.pt` MGVQ releases (a dict with "model")."""
    state = {k.removeprefix("state."): v.float() for k, v in load_file(str(GOLDEN)).items() if "state." in k}
    path = tmp_path_factory.mktemp("mgvq") / "mgvq_f16c32_g8.pt"
    torch.save({"model": state}, path)
    return path


def test_help_names_both_formats_and_every_option():
    result = onetoken("convert", "--help")
    assert result.returncode == 0 and "llava" in result.stdout and "voco-llama" in result.stdout
    llava = " ".join(onetoken("convert", "llava", "--help").stdout.split())
    for option in ("--clip", "--mgvq", "--out", "--dtype {bf16,fp16,fp32}", "--pd-hidden", "src"):
        assert option in llava, option
    voco = onetoken("convert", "voco-llama", "--help").stdout
    assert "--clip CLIP" in voco and "ready to serve" in " ".join(voco.split())
    assert set(DTYPE_NAMES) == set(DTYPES)


def test_llava_with_mgvq_prints_what_is_pretrained_and_what_is_not(published, mgvq_pt, tmp_path, capsys):
    out = tmp_path / "htc"
    args = ["convert", "llava", str(published.original), "--clip", str(published.clip)]
    assert main([*args, "--mgvq", str(mgvq_pt), "--out", str(out), "--pd-hidden", "64"]) == 0
    printed = capsys.readouterr().out
    pretrained, untrained = printed.split("pretrained:\n")[1].split("untrained (new):\n")
    parts = {line.split()[0] for line in pretrained.splitlines()}
    assert parts == {"vision", "P_v", "LLM", "MGVQ"}
    assert {line.split()[0] for line in untrained.splitlines()[:2]} == {"P_d", "voco"}
    assert "the voco bottleneck itself is untrained" in printed
    assert f"onetoken serve --model {out}" in printed
    model = load_pretrained(out)
    assert model.config.channels == "hybrid" and model.config.pd_hidden == 64
    assert model.voco.dtype == torch.float32  # the tiny LLaVA's published dtype


def test_voco_llama_prints_that_it_is_ready(published, tmp_path, capsys):
    folder = write_voco_llama(tmp_path / "voco-llama", published.original, 400)
    out = tmp_path / "out"
    args = ["convert", "voco-llama", str(folder), "--clip", str(published.clip), "--out", str(out)]
    assert main([*args, "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "untrained: nothing" in printed and f"ready to serve: onetoken serve --model {out}" in printed
    assert "voco          VoCo-LLaMA's <voco> embedding (2 tokens)" in printed
    assert load_file(str(out / "model.safetensors"))["voco"].dtype == torch.bfloat16


def test_a_bad_source_is_bad_usage_and_writes_nothing(published, mgvq_pt, tmp_path, capsys):
    out = tmp_path / "out"
    clip = ["--clip", str(published.clip)]
    voco = write_voco_llama(tmp_path / "voco-llama", published.original, 400)
    cases = [
        (["llava", str(tmp_path / "missing")], f"LLaVA folder {tmp_path / 'missing'} does not exist"),
        (["llava", str(published.clip)], "neither LLaVA's original format"),
        (["llava", str(published.original)], "is a separate CLIP model: give the local folder"),
        (["llava", str(published.hf), "--mgvq", str(tmp_path / "no.pt")], "MGVQ checkpoint .* not exist"),
        (["llava", str(published.hf), "--mgvq", str(published.hf / "config.json")], "it is not unpickled"),
        (["voco-llama", str(published.original), *clip], "not a VoCo-LLaMA checkpoint"),
        (["voco-llama", str(published.hf), *clip], "VoCo-LLaMA checkpoints are LLaVA's original format"),
        (["voco-llama", str(voco), "--clip", str(tmp_path)], "no config.json"),
    ]
    for args, message in cases:
        assert main(["convert", *args, "--out", str(out)]) == 2, args
        [line] = capsys.readouterr().err.splitlines()  # one line, no traceback
        assert line.startswith("error: "), line
        assert re.search(message, line), (message, line)
        assert not out.exists()
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["convert", "llava", str(published.hf), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
