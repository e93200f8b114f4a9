"""The `onetoken` parser (help, defaults, --log-level, --version), `info` and `demo`."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

import pytest

from htcvlm.checkpoint import load_pretrained
from htcvlm.defaults import DEFAULT_MODEL_DIR
from llm_worker.cli import build_parser, main
from tests.llm_worker.helpers import onetoken


def subparsers(parser: argparse.ArgumentParser, name: str = "onetoken") -> dict[str, argparse.ArgumentParser]:
    """Every parser under `parser`, itself included, by its command line ("onetoken analyze attention")."""
    found = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                found |= subparsers(sub, f"{name} {command}")
    return found


def test_every_option_has_help_and_its_default_shown() -> None:
    for name, parser in subparsers(build_parser()).items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(
                action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
            ):
                continue
            assert action.help, f"{name} {action.dest} has no help text"
            if action.default not in (None, False, "", argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {action.dest}"
    ingest = " ".join(subparsers(build_parser())["onetoken ingest"].format_help().split())
    assert "--batch-size BATCH_SIZE images per encoder call (default: 32)" in ingest
    assert (
        "--log-level {DEBUG,INFO,WARNING,ERROR,CRITICAL} log level [$ONETOKEN_LOG_LEVEL] (default: WARNING)"
        in ingest
    )
    assert "3 finished, but some files failed" in ingest


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["info"], "WARNING"),
        (["--log-level", "debug", "info"], "DEBUG"),
        (["info", "--log-level", "debug"], "DEBUG"),
        (["--log-level", "error", "info", "--log-level", "info"], "INFO"),
        (["analyze", "attention", "--model", "m", "--log-level", "ERROR"], "ERROR"),
        (["ingest", "corpus", "--log-level", "info"], "INFO"),
    ],
)
def test_log_level_is_taken_before_and_after_the_subcommand(argv: list[str], level: str) -> None:
    assert build_parser().parse_args(argv).log_level == level


def test_log_level_defaults_to_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONETOKEN_LOG_LEVEL", "info")
    assert build_parser().parse_args(["serve"]).log_level == "INFO"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "chatty"])


def test_version_is_the_installed_distributions() -> None:
    result = onetoken("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"onetoken {importlib.metadata.version('onetoken')}"


def fingerprint_line(folder: Path) -> str:
    model = load_pretrained(folder)
    return f"fingerprint       {model.fingerprint()[:16]} (preset {model.config.name})"


def test_info_describes_the_model_serve_loads(model_dir: Path) -> None:
    """ONETOKEN_MODEL (what serve loads) and --model: that checkpoint, not the paper preset."""
    result = onetoken("info", env={**os.environ, "ONETOKEN_MODEL": str(model_dir)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"model             {model_dir}"
    assert lines[1] == fingerprint_line(model_dir)
    params = sum(p.numel() for p in load_pretrained(model_dir).parameters())
    assert f"parameters        {params / 1e6:,.1f} M" in result.stdout


def test_info_takes_model_and_defaults_to_the_shipped_model(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ONETOKEN_MODEL", raising=False)
    assert build_parser().parse_args(["serve"]).model == str(DEFAULT_MODEL_DIR)
    assert main(["info"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"model             {DEFAULT_MODEL_DIR}",
        fingerprint_line(DEFAULT_MODEL_DIR),
    ]
    assert main(["info", "--model", str(model_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"model             {model_dir}"
    assert main(["info", "--preset", "paper"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "preset            paper (geometry only, no weights)"


def test_demo_keeps_its_store_and_index_in_its_workdir(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ray_cluster: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("ONETOKEN_STORE", "ONETOKEN_INDEX_DIR"):
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / "work"
    argv = ["demo", "--workdir", str(workdir), "--images", "2", "--model", str(model_dir)]
    assert main([*argv, "--encoder-backend", "local"]) == 0
    out = capsys.readouterr().out
    assert f"== store {workdir / 'records'}, index {workdir / 'index'}" in out
    assert (workdir / "records").is_dir() and (workdir / "index" / "manifest.json").is_file()
    assert len(list((workdir / "reports").glob("ingest-*.jsonl"))) == 1
    assert not (tmp_path / ".onetoken").exists()
