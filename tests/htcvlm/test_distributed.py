"""Stage 2 on Ray Train fed by Ray Data (htcvlm/train/distributed.py): N workers compute what one does,
a run killed mid-way resumes to the weights of one that was not, and LLaVA data with bad images trains.

One local Ray for the module (tests/conftest.py's `ray_cluster`, 2 CPUs): the workers and their data
stages take half a CPU each so that two of each fit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.data.dataset import ProceduralVQA
from htcvlm.data.llava import by_image, conversations, read_llava
from htcvlm.data.multi import facts_of_cells
from htcvlm.pool import EASY_WEIGHTS, procedural_pool, tensorize
from htcvlm.train.contrastive import contrastive_loss
from htcvlm.train.data import batch_indices
from htcvlm.train.distributed import (
    RUN_NAME,
    Scaling,
    _contrastive_loss,
    fit_stage2,
    latest_step,
    run_distributed,
)
from htcvlm.train.features import (
    SHARD,
    ComputeShards,
    FeatureCache,
    blank_sample,
    frozen_inputs,
    frozen_key,
)
from htcvlm.train.progress import METRICS_FILE
from htcvlm.train.recipe import TrainConfig
from htcvlm.train.run import run_training
from htcvlm.train.stages import step_rng, train_vlm
from htcvlm.train.stream import LlavaSource, ProceduralSource, SampleRows, StepPlan, rows_to_batch

ROOT = Path(__file__).resolve().parents[2]
# The tiny recipe made small: stages 1 and 0 one step each, stage 2 long enough to kill mid-way (the
# global batch of 32 makes the steps after the first checkpoint outlast Ray Train's 2 s report polling).
RECIPE = {
    "steps": 24,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup": 2,
    "easy_steps": 4,
    "eval_every": 4,
    "pool": 64,
    "easy": 16,
    "questions": 2,
    "val_size": 4,
    "mgvq_steps": 1,
    "vision_steps": 1,
}
CFG = TrainConfig.from_name("tiny", **RECIPE)
SOURCE = ProceduralSource(CFG.pool, CFG.easy, CFG.questions, CFG.easy_steps, CFG.batch_size, CFG.seed)
HALF = {"cpus_per_worker": 0.5, "data_cpus": 0.5}  # two workers and two data stages on 2 CPUs


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """The tiny preset after stages 1 and 0, as `onetoken train --workers N` makes out/start."""
    folder = tmp_path_factory.mktemp("start")
    run_training(folder, cfg=replace(CFG, steps=0))
    return folder


@pytest.fixture(scope="module")
def two_workers(start, ray_cluster, tmp_path_factory) -> Path:
    """Stage 2 on 2 workers, 4 micro-batches of 4 rows each per step: uninterrupted."""
    out = tmp_path_factory.mktemp("two")
    fit_stage2(start, out, CFG, SOURCE, Scaling(workers=2, micro_batch=4, **HALF))
    return out


def _log(out: Path) -> list[dict]:
    return json.loads((out / "train_state.json").read_text())["log"]


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in _log(out)]


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=1e-4, msg=name)


def test_each_step_reads_the_same_global_batch_for_any_worker_count():
    for workers, micro in ((1, 8), (1, 2), (2, 2), (4, 1), (2, 4)):
        plan = StepPlan(batch_size=8, workers=workers, micro_batch=micro)
        assert plan.accumulation * micro * workers == 8
        for start_step in (0, 3):
            rows = np.arange(2 * plan.rows_per_step)  # two steps of each worker's stream
            seen = np.concatenate([plan.positions(r, start_step, rows) for r in range(workers)])
            assert sorted(seen) == list(range(8 * start_step, 8 * (start_step + 2)))
    with pytest.raises(ValueError, match="multiple of workers × micro-batch = 3 × 2"):
        StepPlan(batch_size=8, workers=3, micro_batch=2)


def test_sample_rows_are_the_rows_the_single_process_pool_holds(start):
    """Ray Data's map stage renders and tokenizes as `procedural_pool` + `tensorize` do, and row k of a
    worker's stream is the same sample however it is batched."""
    model = load_pretrained(start)
    plan = StepPlan(batch_size=CFG.batch_size, workers=2, micro_batch=2)
    rows = SampleRows(str(start), SOURCE, plan, rank=1, start_step=3, max_text=256)
    out = rows({"data": np.arange(6)})
    assert out["position"].tolist() == [98, 99, 102, 103, 106, 107]  # step 3, its micro-batches 0 to 2
    assert out["ok"].all()
    main = ProceduralVQA("train", CFG.pool, questions=CFG.questions)
    single = ProceduralVQA("train", CFG.easy, weights=EASY_WEIGHTS, seed=1, max_objects=1, questions=2)
    samples = [main[i] if i < CFG.pool else single[i - CFG.pool] for i in out["index"]]
    assert all(i >= CFG.pool for i in out["index"])  # step 3 is within the easy steps: single objects
    pool = tensorize(model, samples)
    width = pool.ids.shape[1]
    assert np.array_equal(out["pixels"], pool.pixels.numpy())
    assert np.array_equal(out["ids"][:, :width], pool.ids.numpy())
    assert np.array_equal(out["segments"], pool.segments.numpy())
    assert (
        np.array_equal(out["scored"][:, :width], pool.scored.numpy()) and not out["scored"][:, width:].any()
    )
    again = rows({"data": np.arange(2, 4)})
    assert np.array_equal(again["ids"], out["ids"][2:4]) and np.array_equal(
        again["pixels"], out["pixels"][2:4]
    )
    assert not out["cut"].any()
    # a row longer than max_text keeps its head, its segments' lengths cut to fit, and says it was cut
    lengths = pool.segments.sum(dim=1).numpy()
    limit = int(lengths.max()) - 3  # the rows here are all of one length: every one is cut
    short = SampleRows(str(start), SOURCE, plan, rank=1, start_step=3, max_text=limit)({"data": np.arange(6)})
    assert np.array_equal(short["cut"], lengths > limit) and short["cut"].all()
    assert np.array_equal(short["ids"], pool.ids[:, :limit].numpy())
    assert (short["segments"].sum(axis=1) == limit).all()
    assert np.array_equal(short["scored"], pool.scored[:, :limit].numpy())


def test_datasets_made_for_training_carry_the_paced_scheduling_loop(ray_cluster):
    """Every dataset made after `pace_ray_data` carries the pause in its context (the context travels
    with the dataset to the worker that reads it), the executor calls it, and asking twice adds it once.
    What it saves is measured by bench/bench_ray_data_pacing.py."""
    import ray
    from ray.data import DataContext

    from htcvlm.train import pacing

    pacing.pace_ray_data()
    pacing.pace_ray_data()
    assert DataContext.get_current().custom_execution_callback_classes.count(pacing.PacedScheduling) == 1
    calls = []

    class Counted(pacing.PacedScheduling):
        def on_execution_step(self, executor):
            calls.append(1)
            super().on_execution_step(executor)

    DataContext.get_current().custom_execution_callback_classes.append(Counted)
    try:
        ds = ray.data.from_numpy(np.arange(8)).map_batches(lambda b: b, batch_size=4)
        assert pacing.PacedScheduling in ds.context.custom_execution_callback_classes
        assert sorted(int(x) for b in ds.iter_batches(batch_size=4) for x in b["data"]) == list(range(8))
    finally:
        DataContext.get_current().custom_execution_callback_classes.remove(Counted)
    assert calls  # the loop ran the pause after its steps


def test_two_workers_reach_the_weights_of_one(start, two_workers, tmp_path):
    """Same global batch (32 rows a step), as 2 workers × 4 micro-batches × 4 rows and as 1 worker ×
    4 micro-batches × 8 rows: the same loss curve and the same weights after 24 steps. The one worker
    recomputes the LLM's activations in backward (activation checkpointing): that changes no result."""
    one_worker = Scaling(workers=1, micro_batch=8, activation_checkpointing=True, **HALF)
    fit_stage2(start, tmp_path, CFG, SOURCE, one_worker)
    one, two = _losses(tmp_path), _losses(two_workers)
    assert len(one) == len(two) == CFG.steps and one[-1] < 0.8 * one[0], one
    np.testing.assert_allclose(one, two, rtol=1e-5)
    _assert_same_weights(tmp_path, two_workers)
    assert not torch.equal(
        load_file(str(tmp_path / "model.safetensors"))["voco"],
        load_file(str(start / "model.safetensors"))["voco"],
    )


def test_the_ray_path_trains_what_the_single_process_trains(start, two_workers, tmp_path):
    """`train_vlm` on the pre-rendered pool reaches the weights of the Ray Train run (2 workers): the
    stream reads, position by position, the rows the single process draws for each step, and a step
    does the same with them (model, loss, learning rate, clipping, AdamW). So does a run made as the
    full recipe's Ray run was (docs/TRAINING.md): one worker on 2 threads, no accumulation, the frozen
    parts' outputs read from a feature cache, and rank 0 validating at every checkpoint in the middle
    of the run."""
    model = load_pretrained(start)
    pool = procedural_pool(model, "train", CFG.pool, CFG.easy, CFG.questions)
    positions = np.arange(CFG.steps * CFG.batch_size)
    by_step = torch.cat([batch_indices(pool, step, CFG) for step in range(CFG.steps)])
    np.testing.assert_array_equal(SOURCE.indices(positions), by_step.numpy())
    single, one = tmp_path / "single", tmp_path / "one"
    single.mkdir(), one.mkdir()
    train_vlm(model, pool, CFG, "hybrid", out=single, show_progress=False)
    _assert_same_weights(single, two_workers, atol=2e-5)

    scaling = Scaling(workers=1, threads=2, feature_cache=str(tmp_path / "features"), **HALF)
    metrics = fit_stage2(start, one, CFG, SOURCE, scaling, val=SOURCE, show_progress=False)
    assert "val_accuracy" in metrics
    validated = [e["step"] for e in _log(one) if "val_accuracy" in e]
    assert validated == list(range(CFG.eval_every, CFG.steps + 1, CFG.eval_every))
    _assert_same_weights(single, one, atol=2e-5)


def test_multi_image_rows_and_the_search_loss_on_two_workers_reach_the_weights_of_one(
    start, two_workers, tmp_path
):
    """Questions over several images and the contrastive search loss on the Ray path: every worker
    draws the step's rows and views as the single-process trainer does and runs its share (the
    InfoNCE over every view, each worker's gradient through its own); 1 and 2 workers end on the same
    weights, and so do 2 workers under FSDP (the LLM's layers sharded, run by all three passes:
    answers, compression for the multi-image rows, the contrastive latents) reading the frozen parts'
    outputs from a feature cache; both resume to the same weights, the cache reused as it is."""
    cfg = replace(
        CFG, steps=3, eval_every=3, multi_rows=6, multi_images=3, multi_step_images=12,
        contrastive=0.5, contrastive_images=6,
    )  # fmt: skip
    one, two, sharded = tmp_path / "one", tmp_path / "two", tmp_path / "fsdp"
    one.mkdir(), two.mkdir(), sharded.mkdir()
    fit_stage2(start, one, cfg, SOURCE, Scaling(workers=1, micro_batch=8, **HALF), val=SOURCE)
    fit_stage2(start, two, cfg, SOURCE, Scaling(workers=2, micro_batch=4, **HALF), val=SOURCE)
    cache = tmp_path / "features"
    scaling = Scaling(workers=2, micro_batch=4, fsdp=True, feature_cache=str(cache), **HALF)
    fit_stage2(start, sharded, cfg, SOURCE, scaling, val=SOURCE)
    written = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(written) == -(-len(SOURCE) // SHARD)
    # float rounding differs with the reduction (DDP's all-reduce, FSDP's reduce-scatter) and AdamW
    # magnifies it where a gradient is near 0: ~1e-5 at most here, against ~lr = 3e-3 for a wrong step
    for other in (two, sharded):
        np.testing.assert_allclose(_losses(one), _losses(other), rtol=1e-5)
        _assert_same_weights(one, other, atol=2e-5)
    logs = [_log(out) for out in (one, two, sharded)]
    nce = [log[0]["nce"] for log in logs]
    assert nce[0] == pytest.approx(nce[1], rel=1e-5) == pytest.approx(nce[2], rel=1e-5) and nce[0] > 0.1
    assert logs[2][-1]["val_accuracy"] == pytest.approx(logs[0][-1]["val_accuracy"])  # rank 0's whole copy
    # one step more: the DDP run and the FSDP run resume from their checkpoints (whole weights and
    # moments, sharded again), the FSDP one reading the cache it made, without computing it again
    longer = replace(cfg, steps=4)
    fit_stage2(start, one, longer, SOURCE, Scaling(workers=1, micro_batch=8, **HALF))
    fit_stage2(start, sharded, longer, SOURCE, scaling)
    assert [len(_losses(out)) for out in (one, sharded)] == [4, 4]
    _assert_same_weights(one, sharded, atol=2e-5)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == written
    # the first step's single-image rows are those of the run without the extra terms: these add to it
    assert _losses(two)[0] > _losses(two_workers)[0] + 0.1 + 0.5 * nce[1]


def test_the_ray_path_draws_the_search_loss_of_the_single_process(start):
    """One worker's contrastive term is `contrastive_loss` on the pre-rendered pool for the same step:
    the same images, the same views, the same InfoNCE."""
    model = load_pretrained(start)
    pool = procedural_pool(model, "train", CFG.pool, CFG.easy, CFG.questions)
    cfg = replace(CFG, contrastive=0.5, contrastive_images=8)
    with torch.no_grad():
        ray_path, tokens = _contrastive_loss(model, cfg, SOURCE, 5, rank=0, world=1)
        single = contrastive_loss(model, pool, 8, step_rng(cfg, 5, "contrastive"))
    torch.testing.assert_close(ray_path, single, rtol=1e-5, atol=1e-6)
    assert tokens == 16 * model.layout.text_position


def test_the_feature_cache_holds_what_the_worker_would_compute(start, tmp_path):
    """Shards of the frozen parts' outputs per sample, read back in any order through the data stage;
    a cache made for other weights or data is refused; a killed pass's leftovers are not shards."""
    model = load_pretrained(start)
    folder = tmp_path / "cache"
    source = replace(SOURCE, pool=300, easy=20)  # two shards, the second partly filled
    cache = FeatureCache(folder)
    manifest = {"shard": SHARD, "images": source.images_key(), **frozen_key(start, True)}
    cache.claim(manifest)
    assert cache.missing(len(source)) == [0, 1]
    ComputeShards(str(start), source, str(folder), True)({"data": np.array([1])})
    (folder / "000000.safetensors.tmp123").write_bytes(b"half a file")
    assert cache.missing(len(source)) == [0]
    ComputeShards(str(start), source, str(folder), True)({"data": np.array([0])})
    assert cache.missing(len(source)) == []
    indices = np.array([301, 3, 255, 256, 3])
    got = cache.read(indices)
    pixels = tensorize(model, source.samples(indices, 64)).pixels.float() / 255.0
    want = frozen_inputs(model, pixels, freeze_vision=True)
    assert got.keys() == {"quantized", "patches", "readable"} and want.keys() == {"quantized", "patches"}
    assert (got["readable"] == 1).all()
    for key in want:
        np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-5, atol=1e-6)
    plan = StepPlan(batch_size=CFG.batch_size, workers=2, micro_batch=2)
    rows = SampleRows(str(start), source, plan, rank=0, start_step=9, max_text=256, features=str(folder))
    out = rows({"data": np.arange(4)})
    np.testing.assert_array_equal(out["patches"], cache.read(out["index"])["patches"])
    # the same rows as without a cache, the scenes left unrendered: the worker reads the features instead
    rendered = SampleRows(str(start), source, plan, rank=0, start_step=9, max_text=256)(
        {"data": np.arange(4)}
    )
    for key in ("position", "index", "ids", "segments", "scored", "ok"):
        np.testing.assert_array_equal(out[key], rendered[key])
    assert not out["pixels"].any() and rendered["pixels"].any()
    batch = rows_to_batch(out, torch.device("cpu"))
    assert batch["patches"].shape == (4, *want["patches"].shape[1:])
    cache.claim(manifest)  # the same features: accepted
    with pytest.raises(ValueError, match="its images differ"):
        cache.claim({**manifest, "images": SOURCE.images_key()})
    with pytest.raises(ValueError, match="its config, freeze_vision, weights_sha256 differ"):
        cache.claim({"shard": SHARD, "images": source.images_key(), **frozen_key(start, False)})
    other = load_pretrained(start)
    with torch.no_grad():
        next(other.mgvq.parameters()).add_(1.0)
    moved = tmp_path / "moved"
    save_pretrained(other, moved)
    assert frozen_key(moved, True)["weights_sha256"] != manifest["weights_sha256"]
    llm_only = load_pretrained(start)
    with torch.no_grad():
        llm_only.voco.add_(1.0)
    save_pretrained(llm_only, tmp_path / "llm_only")
    assert frozen_key(tmp_path / "llm_only", True) == frozen_key(start, True)  # the LLM is not a frozen part


def test_with_a_feature_cache_llava_images_are_decoded_once(start, tmp_path, monkeypatch):
    """The feature pass records which LLaVA images could be read; the data stage then makes the same
    rows as without a cache, unreadable images skipped as before, without opening one image file."""
    images = tmp_path / "img"
    images.mkdir()
    entries = []
    for i in range(5):
        if i == 1:
            (images / f"{i}.jpg").write_bytes(b"not an image at all")
        else:
            Image.effect_noise((40 + 5 * i, 30), 30).convert("RGB").save(images / f"{i}.jpg")
        turns = [{"from": "human", "value": f"<image>\nWhat is {i}?"}, {"from": "gpt", "value": f"it is {i}"}]
        entries.append({"id": str(i), "image": f"img/{i}.jpg", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    turns = read_llava(tmp_path / "data.json", tmp_path).turns
    source = LlavaSource(by_image(conversations(turns)), batch_size=4, seed=0)
    folder = tmp_path / "cache"
    FeatureCache(folder).claim({"shard": SHARD, "images": source.images_key(), **frozen_key(start, True)})
    ComputeShards(str(start), source, str(folder), True)({"data": np.array([0])})
    assert FeatureCache(folder).read(np.arange(5))["readable"].tolist() == [1, 0, 1, 1, 1]
    plan = StepPlan(batch_size=4, workers=1, micro_batch=4)
    rows = {"data": np.arange(12)}  # 3 steps
    decoded = SampleRows(str(start), source, plan, rank=0, start_step=0, max_text=256)(rows)
    assert not decoded["ok"].all()  # image 1 is drawn
    cached = SampleRows(str(start), source, plan, rank=0, start_step=0, max_text=256, features=str(folder))

    def never(path):
        raise AssertionError(f"{path} opened")

    monkeypatch.setattr("htcvlm.train.stream.open_rgb", never)
    out = cached(rows)
    for key in ("position", "index", "ids", "segments", "scored", "ok", "cut"):
        np.testing.assert_array_equal(out[key], decoded[key])
    assert "readable" not in out and not out["pixels"].any() and decoded["pixels"].any()


def test_the_stream_asks_about_the_scenes_the_pool_holds(start):
    """The facts the Ray path draws multi-image questions from are the pre-rendered pool's, so both
    trainers draw the same questions for a step."""
    pool = procedural_pool(load_pretrained(start), "train", CFG.pool, CFG.easy, CFG.questions)
    facts = SOURCE.facts()
    assert len(facts) == CFG.pool + CFG.easy
    assert list(facts) == facts_of_cells(pool.cells)
    with pytest.raises(IndexError):
        facts[len(facts)]


def test_the_ray_path_refuses_what_it_does_not_train(start, tmp_path):
    llava = LlavaSource((), CFG.batch_size, 0)
    with pytest.raises(ValueError, match="procedural data only"):
        fit_stage2(start, tmp_path, replace(CFG, multi_rows=4), llava, Scaling())
    with pytest.raises(ValueError, match="LoRA adapters train on one GPU without it"):
        fit_stage2(start, tmp_path, replace(CFG, lora_rank=4), SOURCE, Scaling(fsdp=True))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def test_the_driver_logs_every_step_and_keeps_the_run_config_beside_each_checkpoint(two_workers):
    """Per step, the driver's metrics.jsonl holds the loss the workers logged, the learning rate, the
    tokens through the LLM and their rate; every checkpoint Ray Train kept, and the output folder,
    hold the run's config (training.json) beside the weights."""
    entries, log = _metrics(two_workers), _log(two_workers)
    assert [e["step"] for e in entries] == list(range(1, CFG.steps + 1))
    np.testing.assert_allclose([e["loss"] for e in entries], [e["loss"] for e in log], rtol=1e-6)
    # 32 rows a step, each its prefix [V_hy; voco] and up to 2 questions (prompts and scored answers)
    prefix = load_pretrained(two_workers).layout.text_position
    assert all(e["tokens"] > 32 * prefix + e["scored_tokens"] > 32 * prefix for e in entries)
    assert all(e["tokens_per_s"] == pytest.approx(e["tokens"] / e["seconds"]) for e in entries)
    assert entries[0]["lr"] == pytest.approx(CFG.lr / CFG.warmup)  # warm-up, then the peak
    assert entries[1]["lr"] == pytest.approx(CFG.lr)
    assert [e["step"] for e in entries if "bad_images" in e] == list(range(4, CFG.steps + 1, 4))
    record = json.loads((two_workers / "training.json").read_text())
    assert record["train"] == json.loads(json.dumps(asdict(CFG))) and record["scaling"]["workers"] == 2
    kept = sorted(p for p in (two_workers / "ray" / RUN_NAME).glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2  # Ray Train keeps the last two
    for folder in kept:
        assert json.loads((folder / "training.json").read_text()) == record
        assert (folder / "model.safetensors").is_file()


def _onetoken_train(out: Path, *more: str) -> subprocess.Popen:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]
    command = [sys.executable, "-m", "llm_worker.cli", "train", "--out", str(out), *flags]
    command += ["--workers", "2", "--micro-batch-size", "4", "--threads", "1", *more]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # a session of its own: whatever the run started goes down with it when the test kills the group
    return subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def settled_step(runs: Path, quiet_s: float = 3.0, timeout_s: float = 60.0) -> int:
    """The last checkpointed step once no new checkpoint has appeared for `quiet_s`: Ray's workers of a
    killed driver can still register one while they go down, and the rerun resumes from that."""
    deadline = time.monotonic() + timeout_s
    step, since = latest_step(runs), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := latest_step(runs)) != step:
            step, since = now, time.monotonic()
    return step


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(start, two_workers, tmp_path):
    """`onetoken train --workers 2 --fsdp --feature-cache DIR`, SIGKILLed once its first checkpoint is
    registered, then the same command again: it resumes there, reads the features the killed run cached
    without computing them again, and ends where the uninterrupted DDP run (`two_workers`) ended."""
    out, features = tmp_path / "run", tmp_path / "features"
    shutil.copytree(start, out / "start")  # the same stages 1 and 0: the command reuses them
    snapshot = out / "ray" / RUN_NAME / "checkpoint_manager_snapshot.json"
    flags = ("--fsdp", "--feature-cache", str(features))
    proc = _onetoken_train(out, *flags)
    try:
        deadline = time.monotonic() + 240
        while not snapshot.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()[-3000:]}"
        assert snapshot.is_file(), "no checkpoint within 240 s"
        os.kill(proc.pid, signal.SIGKILL)  # the driver: its local Ray follows it down
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
        proc.wait(timeout=30)
    killed_at = settled_step(out / "ray")
    assert 0 < killed_at < CFG.steps, f"killed after step {killed_at}: not mid-way"
    shards = {p.name: p.stat().st_mtime_ns for p in features.glob("*.safetensors")}
    assert shards, "the killed run cached no features"
    rerun = _onetoken_train(out, *flags)
    try:
        output, _ = rerun.communicate(timeout=300)
    finally:
        _kill_group(rerun)
    assert rerun.returncode == 0, output[-3000:]
    recorded = json.loads((out / "training.json").read_text())
    assert recorded["resumed_from_step"] == killed_at
    log = _log(out)
    assert [e["step"] for e in log] == list(range(1, CFG.steps + 1))
    assert [e["step"] for e in log if "val_accuracy" in e] == list(range(4, CFG.steps + 1, 4))
    assert recorded["scaling"]["fsdp"] and recorded["scaling"]["feature_cache"] == str(features)
    assert {p.name: p.stat().st_mtime_ns for p in features.glob("*.safetensors")} == shards
    np.testing.assert_allclose(_losses(out), _losses(two_workers), rtol=1e-5)
    _assert_same_weights(out, two_workers, atol=5e-5)  # sharded sums: see the multi-image test
    # the rerun dropped the killed run's lines after its checkpoint and logged every step from there; the
    # killed driver may have missed the last steps before its checkpoint (never drained from the queue)
    steps = [e["step"] for e in _metrics(out)]
    assert steps == sorted(set(steps)) and steps[-(CFG.steps - killed_at) :] == list(range(killed_at + 1, 25))


def test_merged_lora_adapters_give_the_logits_of_the_adapted_model(tokenizer, tmp_path):
    """Adapters merged into the LLM's weights: the same logits, the state dict of a model that never had
    adapters, and a checkpoint serving loads as any other."""
    from htcvlm.checkpoint import save_pretrained
    from htcvlm.train.lora import add_adapters, has_adapters, merge_adapters
    from tests.htcvlm.helpers import make_model

    model = make_model(tokenizer, seed=0)
    plain = set(model.state_dict())
    data = ProceduralVQA("train", 3, questions=2)
    batch = tensorize(model, [data[i] for i in range(3)]).batch(torch.arange(3))
    batch.pop("scored")
    with torch.no_grad():
        before = model(**batch)[0]
        add_adapters(model, rank=4)
        torch.testing.assert_close(model(**batch)[0], before)  # B starts at zero
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")}
        assert trainable and all(".lora_" in n for n in trainable)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)  # as if trained
        adapted = model(**batch)[0]
        assert (adapted - before).abs().max() > 0.1
        merge_adapters(model)
        torch.testing.assert_close(model(**batch)[0], adapted, atol=1e-5, rtol=1e-5)
    assert not has_adapters(model) and set(model.state_dict()) == plain
    with torch.no_grad():
        served = load_pretrained(save_pretrained(model, tmp_path))(**batch)[0]
    torch.testing.assert_close(served, adapted, atol=1e-5, rtol=1e-5)


def test_llava_data_with_missing_and_corrupt_images_trains(start, ray_cluster, tmp_path):
    """A LLaVA-format JSON whose images are decoded in Ray Data's workers: a missing file is left out when
    listed, corrupt ones (not an image, a truncated JPEG) are skipped as rows that score nothing and
    counted; the good rows train, one of them two entries about one image packed. With LoRA: the adapters
    train and come out merged into a checkpoint that loads as any other."""
    images = tmp_path / "img"
    images.mkdir()
    entries = []
    for i in range(10):
        name = f"{i}.jpg"
        if i == 0:
            (images / name).write_bytes(b"not an image at all")
        elif i == 1:
            Image.effect_noise((90, 60), 40).convert("RGB").save(images / name)
            (images / name).write_bytes((images / name).read_bytes()[:200])  # cut mid-stream
        elif i != 2:  # image 2 is missing
            Image.effect_noise((70 + 3 * i, 50), 20 + 5 * i).convert("RGB").save(images / name)
        turns = [
            {"from": "human", "value": "<image>\nIs it bright?"},
            {"from": "gpt", "value": "yes" if i % 2 else "no"},
        ]
        entries.append({"id": str(i), "image": f"img/{name}", "conversations": turns})
    again = [{"from": "human", "value": "Is it noisy?\n<image>"}, {"from": "gpt", "value": "yes"}]
    entries.insert(6, {"id": "3b", "image": "img/3.jpg", "conversations": again})  # packed with entry 3
    (tmp_path / "data.json").write_text(json.dumps(entries))
    # 10 listed turns, the last 2 held out: the stream draws from 7 images, 0 and 1 the corrupt ones, 2 the
    # image of entries 3 and 3b; rows longer than the longest one-entry row are cut: image 3's
    val_size = 2
    turns = read_llava(tmp_path / "data.json", tmp_path, on_missing="skip").turns[:-val_size]
    source = LlavaSource(by_image(conversations(turns)), 4, CFG.seed)  # the run's batch of 4
    model = load_pretrained(start)
    size = model.config.image_size
    samples = [s or blank_sample(size) for s in source.samples(np.arange(len(source)), size)]
    lengths = np.array([int(tensorize(model, [s]).lengths[0]) for s in samples])
    max_text = int(np.delete(lengths, 2).max())
    assert lengths[2] > max_text
    cfg = replace(CFG, steps=4, batch_size=4, val_size=val_size, eval_every=2, lora_rank=4, max_text=max_text)
    out = tmp_path / "run"
    metrics = run_distributed(
        out,
        Scaling(workers=1, micro_batch=2, **HALF),
        cfg=cfg,
        llava=(tmp_path / "data.json", tmp_path),
        init_from=start,
    )
    recorded = json.loads((out / "training.json").read_text())
    assert recorded["missing_images"] == 1
    drawn = source.indices(np.arange(cfg.steps * cfg.batch_size))
    assert {0, 1} <= set(drawn.tolist())  # both are drawn in these 16 rows
    assert metrics["bad_images"] == 2
    log = _log(out)
    assert sum(e["skipped_rows"] for e in log) == int(np.isin(drawn, [0, 1]).sum())
    assert sum(e["cut_rows"] for e in log) == int((drawn == 2).sum()) > 0
    assert all(np.isfinite(e["loss"]) for e in log) and "val_accuracy" in log[-1]
    trained, before = load_file(str(out / "model.safetensors")), load_file(str(start / "model.safetensors"))
    assert trained.keys() == before.keys()  # merged: no adapter weights left
    assert not torch.equal(trained["voco"], before["voco"])
    changed = {k for k in trained if k.startswith("llm.") and not torch.equal(trained[k], before[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only where adapters were
    load_pretrained(out)
