"""`onetoken ingest` as a user runs it: what it prints, its exit status, its reports, a store outage.

The subprocess runs start their own local Ray; the in-process ones (`main([...])`) share the session's.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
from pathlib import Path

import pytest

from llm_worker.cli import main
from tests.cache.helpers import RedisServer, free_port
from tests.encoder_service.helpers import png
from tests.encoder_service.test_ingest import kill_after_first_write
from tests.llm_worker.helpers import bar_and_other_lines, onetoken


def write_corpus(folder: Path, good: int = 2) -> Path:
    """`good` PNGs, a text file and an empty file."""
    folder.mkdir(parents=True)
    for i in range(good):
        (folder / f"{i:03d}.png").write_bytes(png(i, size=32))
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return folder


def service_flags(model_dir: Path, tmp_path: Path) -> list[str]:
    """The model, and a store and index of the test's own."""
    return [
        "--model",
        str(model_dir),
        "--store",
        str(tmp_path / "records"),
        "--index-dir",
        str(tmp_path / "index"),
    ]


def test_ingest_prints_its_bar_and_summary_only_and_exits_3_when_files_failed(
    model_dir: Path, tmp_path: Path
):
    """No Ray lines (core_worker, progress bars, executor INFO) among ours; a report folder that does not
    exist yet is made; the summary names the report; the exit status says files failed."""
    corpus = write_corpus(tmp_path / "corpus")
    report = tmp_path / "new" / "folder" / "failed.jsonl"
    store = service_flags(model_dir, tmp_path)
    result = onetoken("ingest", str(corpus), *store, "--report", str(report), cwd=tmp_path, timeout=300)

    assert result.returncode == 3, result.stderr
    bar, other = bar_and_other_lines(result.stderr)
    assert other == [] and bar, result.stderr
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert {Path(r["path"]).name: r["reason"] for r in rows} == {
        "notes.txt": "not an image: the bytes match no known image format",
        "empty.png": "empty file (0 bytes)",
    }
    summary, names = result.stdout.splitlines()
    assert summary.startswith("encoded 2, already cached 0, failed 2 in "), result.stdout
    assert names == f"failures and their reasons: {report} (run {rows[0]['run']})"


def test_ingest_keeps_every_runs_report_and_exits_0_when_all_went_well(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ray_cluster,
):
    """Without --report each run gets its own report under .onetoken/reports; a clean run writes none."""
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    store = service_flags(model_dir, tmp_path)

    printed = []
    for _ in range(2):
        assert main(["ingest", str(corpus), *store]) == 3
        printed.append(capsys.readouterr().out.splitlines()[-1])
    reports = sorted(Path(".onetoken/reports").iterdir())
    assert len(reports) == 2
    for report, line in zip(reports, printed, strict=True):
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        assert sorted(Path(r["path"]).name for r in rows) == ["empty.png", "notes.txt"]
        run = rows[0]["run"]
        assert report.name == f"ingest-{run}.jsonl" and {r["run"] for r in rows} == {run}
        assert line == f"failures and their reasons: {report} (run {run})"

    assert main(["ingest", str(corpus / "000.png"), str(corpus / "001.png"), *store]) == 0
    assert "already cached 2, failed 0" in capsys.readouterr().out
    assert len(list(Path(".onetoken/reports").iterdir())) == 2


def test_a_bad_report_path_fails_before_ray_starts(tmp_path: Path):
    """--report under a regular file: the error names the path, and comes before joining Ray (here a
    cluster address where nothing listens, which would fail otherwise)."""
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "file").write_text("a file, not a folder")
    report = tmp_path / "file" / "report.jsonl"
    ray_address = f"127.0.0.1:{free_port()}"
    result = onetoken(
        "ingest", str(tmp_path / "a.png"), "--report", str(report), "--ray-address", ray_address, cwd=tmp_path
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()  # no traceback, nothing about Ray
    assert line.startswith("error: ") and f"'{tmp_path / 'file'}'" in line, result.stderr


def test_a_store_outage_prints_the_error_and_the_command_that_resumes(model_dir: Path, tmp_path: Path):
    """A private redis-server killed mid-ingest: the store's own error and the command line to resume
    (no Ray traceback, no Ray advice); with the store back, that command finishes the corpus."""
    n = 100
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(n):
        (corpus / f"{i:03d}.png").write_bytes(png(i, size=32))
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    private = RedisServer(redis_dir, "--appendfsync", "always")  # what was stored survives the SIGKILL
    private.start()
    args = ["ingest", str(corpus), "--model", str(model_dir), "--store", private.url]
    args += ["--index-dir", str(tmp_path / "index"), "--batch-size", "2"]
    killer = threading.Thread(target=kill_after_first_write, args=(private,), daemon=True)
    killer.start()
    try:
        stopped = onetoken(*args, cwd=tmp_path, timeout=300)
        killer.join(timeout=10)
        assert stopped.returncode == 1, stopped.stderr
        _, other = bar_and_other_lines(stopped.stderr)
        assert len(other) == 2, stopped.stderr
        assert (
            other[0].startswith("error: StoreUnavailableError: Redis ")
            and "is the store running?" in other[0]
        )
        assert (
            other[1]
            == f"resume with: {shlex.join(['onetoken', *args])}  (stored images are not encoded again)"
        )
        assert "Traceback" not in stopped.stderr and "max_errored_blocks" not in stopped.stderr

        private.start()  # same port and directory: what was stored comes back from the AOF
        resume = shlex.split(other[1].removeprefix("resume with: ").split("  (")[0])
        assert resume[0] == "onetoken"
        resumed = onetoken(*resume[1:], cwd=tmp_path, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        counts = re.match(r"encoded (\d+), already cached (\d+), failed 0 ", resumed.stdout)
        assert counts is not None, resumed.stdout
        encoded, cached = int(counts[1]), int(counts[2])
        assert encoded + cached == n and cached > 0, resumed.stdout
    finally:
        private.kill()
