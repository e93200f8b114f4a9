"""The `onetoken` parser (help, defaults, --log-level, --version), `info` and `demo`."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

import pytest

from htcvlm.checkpoint import load_pretrained
from htcvlm.defaults import DEFAULT_MODEL_DIR
from llm_worker.cli import build_parser, main, worker_config
from llm_worker.config import WorkerConfig
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


def test_retrieval_measures_the_photos_alone_with_no_procedural_scenes(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--procedural 0` skips the scenes (a photo figure for several augmentation seeds costs seconds);
    a negative count is refused before any model loads."""
    assert main(["retrieval", "--model", str(model_dir), "--procedural", "0", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scikit-image photos (25)") and "procedural" not in out
    assert "pooled (originals and copies indexed together" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["retrieval", "--model", str(model_dir), "--procedural", "-1"])


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


def test_the_gpu_share_of_an_encoder_comes_from_a_flag_or_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset: Ray's default (one GPU each where the cluster has GPUs); compose sets 0.5 for worker and
    ingest alike, so each leaves half of every GPU to the other."""
    monkeypatch.delenv("ONETOKEN_GPUS_PER_ENCODER", raising=False)
    assert worker_config(build_parser().parse_args(["serve"])).encoder.num_gpus_per_actor is None
    monkeypatch.setenv("ONETOKEN_GPUS_PER_ENCODER", "0.5")
    for command in (["serve"], ["ingest", "corpus"]):
        assert worker_config(build_parser().parse_args(command)).encoder.num_gpus_per_actor == 0.5
    args = build_parser().parse_args(["serve", "--gpus-per-encoder", "1"])
    assert worker_config(args).encoder.num_gpus_per_actor == 1.0
    with pytest.raises(ValueError, match="num_gpus_per_actor must be >= 0"):
        worker_config(build_parser().parse_args(["serve", "--gpus-per-encoder", "-1"]))


def test_serve_takes_metrics_port_and_log_format_from_flags_or_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("ONETOKEN_METRICS_PORT", "ONETOKEN_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    config = worker_config(build_parser().parse_args(["serve"]))
    assert (config.metrics_port, config.log_format) == (None, "plain")  # metrics off by default
    monkeypatch.setenv("ONETOKEN_METRICS_PORT", "0")
    monkeypatch.setenv("ONETOKEN_LOG_FORMAT", "json")
    config = worker_config(build_parser().parse_args(["serve"]))
    assert (config.metrics_port, config.log_format) == (0, "json")
    args = build_parser().parse_args(["serve", "--metrics-port", "9464", "--log-format", "plain"])
    assert (worker_config(args).metrics_port, worker_config(args).log_format) == (9464, "plain")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metrics_port": -1}, "metrics_port must be in [0, 65535]"),
        ({"metrics_port": 50051, "port": 50051}, "give the metrics another port"),
        ({"log_format": "xml"}, "log_format must be one of ('plain', 'json')"),
    ],
)
def test_worker_config_refuses_bad_metrics_and_log_settings(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        WorkerConfig(**changes)
    assert message in str(err.value)
    WorkerConfig(metrics_port=0, port=0)  # two free ports, chosen apart
