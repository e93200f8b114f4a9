"""Stage 2 on Ray Train (`TorchTrainer`, DDP: gloo on CPUs, NCCL on GPUs) fed by Ray Data.

- `run_distributed`: what `onetoken train --workers N` runs. Stages 1 and 0 (the tiny recipe's MGVQ and
  tower) run first in this process through `run_training(steps=0)`, into `out/start`; stage 2 is
  `fit_stage2` from there; the final weights land in `out` as a normal checkpoint folder.
- `fit_stage2`: one `TorchTrainer` run. Each worker reads its own Ray Data stream of positions mapped to
  rows by `stream.SampleRows` (procedural scenes rendered, LLaVA images decoded, in Ray Data's workers);
  `train_worker` is the loop each Ray Train worker runs. Rank 0 sends every step's metrics through a Ray
  queue to this process, where `progress.StepLog` shows and keeps them (bar, `out/metrics.jsonl`).

Why one stream per worker rather than `streaming_split` of one dataset: `streaming_split` hands blocks to
whichever worker asks first, so which worker saw which sample would depend on timing. Here worker r's
a-th micro-batch of step s is fixed by `StepPlan`, so N workers together read the step's global batch
whatever N is, and a resumed run reads what the interrupted one would have read next.

Questions over several images (`--multi-rows`, procedural data): every worker draws the step's rows as
the single process does (`stages.step_rng`, `multi.draw_rows`, facts from `stream.SourceFacts`) and
runs every world-th of them, rendering their images itself (`_multi_image_loss`).

Resuming: Ray Train keeps the run in `out/ray/stage2` and restores its latest checkpoint when the same
command runs again; the driver reads that checkpoint's step to start each worker's stream there, and each
worker restores the model and AdamW state from it (safetensors and JSON, never pickle). Stage 2 draws
no random numbers beyond the data positions (the tiny LLM has no dropout), so step and position are the
whole training state.

Ray is imported inside the functions: the model core imports without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.data.llava import by_image, conversations, read_llava
from htcvlm.evaluate import accuracy
from htcvlm.model import HTCVLM
from htcvlm.pool import VQATensors, procedural_pool, tensorize
from htcvlm.train.contrastive import info_nce, view_latents, view_pairs
from htcvlm.train.features import frozen_inputs, precompute, worker_autocast
from htcvlm.train.fsdp import (
    clip_grad_norm,
    full_state,
    is_sharded,
    plain_copy,
    release_layers,
    shard_layers,
    sync_replicated,
)
from htcvlm.train.loop import load_training_state, lr_at, save_training_state
from htcvlm.train.lora import add_adapters, merge_adapters
from htcvlm.train.multi import draw_rows, multi_image_logits
from htcvlm.train.progress import StepLog
from htcvlm.train.recipe import RECIPES, TrainConfig, Variant
from htcvlm.train.run import RUN_RECORD, run_record, run_training
from htcvlm.train.stages import answer_loss, frozen_modules, stage2_optimizer, stage2_parameters, step_rng
from htcvlm.train.stream import (
    LlavaSource,
    ProceduralSource,
    SampleRows,
    Source,
    SourceFacts,
    StepPlan,
    rows_to_batch,
)

logger = logging.getLogger(__name__)

RUN_NAME = "stage2"  # Ray Train's run folder under out/ray


@dataclass(frozen=True)
class Scaling:
    """Where stage 2 runs: `workers` Ray Train workers with these resources each."""

    workers: int = 1
    gpus_per_worker: float = 0.0  # > 0: CUDA, NCCL and bf16 autocast; 0: CPU, gloo and fp32
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0  # each worker's Ray Data actor rendering or decoding its rows
    micro_batch: int | None = None  # rows per forward; None: the global batch / workers (no accumulation)
    threads: int = 1  # torch threads in each worker
    activation_checkpointing: bool = False  # the LLM's gradient checkpointing
    fsdp: bool = False  # shard the LLM's decoder layers over the workers (`htcvlm.train.fsdp`); else DDP
    # a folder for the frozen parts' outputs, computed once by a Ray Data pass (`htcvlm.train.features`)
    # and read by the data stages; None: the workers run the frozen parts on every micro-batch
    feature_cache: str | None = None

    def plan(self, batch_size: int) -> StepPlan:
        micro = self.micro_batch or batch_size // self.workers
        return StepPlan(batch_size, self.workers, micro)


def latest_step(storage: Path) -> int:
    """The step of the latest checkpoint Ray Train registered under `storage`/RUN_NAME; 0 if none."""
    from ray.train import Result

    run = storage / RUN_NAME
    if not (run / "checkpoint_manager_snapshot.json").is_file():
        return 0
    checkpoint = Result.from_path(str(run)).checkpoint
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "train_state.json").read_text())["step"]


def fit_stage2(
    start: Path,
    out: Path,
    cfg: TrainConfig,
    source: Source,
    scaling: Scaling,
    variant: Variant = "hybrid",
    val: Source | None = None,
    record: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Stage 2 from the checkpoint at `start` on Ray Train; resumes from `out`/ray when it holds a run.
    Writes the final model and training state into `out`; returns the last reported metrics.

    `record`: the run's config as `run.run_record` lays it out (default: the variant, `cfg` and
    `scaling`), saved as `out/training.json` before training and beside every checkpoint. Every step's
    metrics reach this process (`progress.StepLog`: a bar, `out/metrics.jsonl`, TensorBoard if installed)."""
    import ray
    from ray.data import ActorPoolStrategy, ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from htcvlm.train.pacing import pace_ray_data

    pace_ray_data()  # before any dataset is made: each carries the context to the workers reading it
    plan = scaling.plan(cfg.batch_size)
    if cfg.multi_rows and not isinstance(source, ProceduralSource):
        raise ValueError("multi-image rows need scenes to ask about: procedural data only")
    if scaling.fsdp and cfg.lora_rank:
        raise ValueError("--fsdp shards a full fine-tune; LoRA adapters train on one GPU without it")
    start, storage = start.resolve(), (out / "ray").resolve()  # workers run in folders of their own
    start_step = latest_step(storage)
    if start_step:
        logger.info("resuming stage 2 from step %d (%s)", start_step, storage / RUN_NAME)
    if record is None:
        record = {"variant": variant, "train": asdict(cfg), "scaling": asdict(scaling)}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2))
    features = None
    if scaling.feature_cache is not None:
        cache = precompute(
            scaling.feature_cache,
            start,
            source,
            cfg.freeze_vision,
            actors=scaling.workers,
            cpus=scaling.cpus_per_worker,
            gpus=scaling.gpus_per_worker,
        )
        features = str(cache.folder.resolve())
    datasets = {}
    remaining = (cfg.steps - start_step) * plan.rows_per_step
    for rank in range(plan.workers):
        # the row numbers alone live in the object store (no read tasks to schedule beside the workers);
        # SampleRows makes each row from its number in Ray Data's actor
        numbers = ray.data.from_numpy(np.arange(max(remaining, 1)))
        datasets[f"train_{rank}"] = numbers.map_batches(
            SampleRows,
            fn_constructor_args=(str(start), source, plan, rank, start_step, cfg.max_text, features),
            batch_size=plan.micro_batch,
            compute=ActorPoolStrategy(size=1),
            num_cpus=scaling.data_cpus,
        )
    steps = Queue(actor_options={"num_cpus": 0})  # rank 0 -> this process: one entry per step
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "start": str(start),
            "cfg": asdict(cfg),
            "variant": variant,
            "scaling": asdict(scaling),
            "start_step": start_step,
            "val": val,
            "source": source,
            "record": record,
            "features": features,
            "steps": steps,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.workers,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker={"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets=datasets,
        # every worker gets every stream unsplit and reads its own (see the module docstring)
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    with StepLog(out, start_step, cfg.steps, show_progress) as step_log:
        # fit() blocks (and wants the main thread for its signal handlers): a thread follows the steps
        done = threading.Event()
        follower = threading.Thread(target=_follow, args=(steps, step_log, done), daemon=True)
        follower.start()
        try:
            result = trainer.fit()
        finally:
            done.set()
            follower.join()
            steps.shutdown(force=True)
    if result.checkpoint is None:
        raise RuntimeError(f"stage 2 ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        for path in Path(folder).iterdir():
            shutil.copy2(path, out / path.name)
    if cfg.lora_rank:  # the checkpoint holds base weights and adapters apart: serve them merged
        model = load_pretrained(start)
        add_adapters(model, cfg.lora_rank)
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        merge_adapters(model)
        save_pretrained(model.eval(), out)
    return dict(result.metrics or {})


def _follow(steps: Any, step_log: StepLog, done: threading.Event, poll_s: float = 0.25) -> None:
    """Move every entry the workers put in `steps` (a Ray Queue) into `step_log`, until `done` is set
    and the queue is drained."""
    from ray.exceptions import RayError

    while True:
        finished = done.is_set()  # read before draining: an entry put before fit() returned is drained
        try:
            entries = steps.get_nowait_batch(steps.qsize())
        except RayError as e:  # the queue's actor is gone: training goes on, its log ends here
            logger.warning("per-step metrics stopped: %s", e)
            return
        for entry in entries:
            step_log.write(entry)
        if finished:
            return
        done.wait(poll_s)


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker's stage 2: its stream's micro-batches, gradients accumulated then all-reduced
    (DDP), the loss of each step the mean over every scored token of the global batch, so any worker
    count and accumulation computes the same step. Rank 0 validates, and saves the checkpoint that
    every worker reports."""
    import ray.train
    import ray.train.torch

    cfg, scaling = TrainConfig(**config["cfg"]), Scaling(**config["scaling"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(scaling.threads)
    device = ray.train.torch.get_device()
    plan = scaling.plan(cfg.batch_size)
    model = load_pretrained(config["start"], device=device)
    if cfg.lora_rank:
        add_adapters(model, cfg.lora_rank)
    opt = stage2_optimizer(model, cfg)
    step, log = 0, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            step, log = load_training_state(Path(folder), model, opt)
    if step != config["start_step"]:
        raise RuntimeError(
            f"the checkpoint is at step {step} but the data stream starts at {config['start_step']}"
        )
    if scaling.activation_checkpointing:
        model.llm.gradient_checkpointing_enable()
    if scaling.fsdp:
        opt = shard_layers(model, opt, cfg)
        ddp = model  # the layers gather and reduce their own shards; `sync_replicated` does the rest
    else:
        ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    # without syncing: under DDP the last micro-batch's backward all-reduces every gradient
    quiet = contextlib.nullcontext if scaling.fsdp or world == 1 else ddp.no_sync
    frozen, params = frozen_modules(model, cfg), stage2_parameters(model, cfg)
    replicated = [p for p in params if not is_sharded(p)] if scaling.fsdp else []
    model.train()
    for module in frozen:
        module.eval()
    upper = config["variant"] == "upper"
    autocast = worker_autocast(device)
    val = _val_pool(model, config["val"], cfg.val_size) if rank == 0 and config["val"] is not None else None
    rows = iter(
        ray.train.get_dataset_shard(f"train_{rank}").iter_batches(
            batch_size=plan.micro_batch, batch_format="numpy", prefetch_batches=1
        )
    )
    bad: set[int] = set()
    facts = config["source"].facts() if cfg.multi_rows else None
    started = time.perf_counter()
    while step < cfg.steps:
        step_started = time.perf_counter()
        micro = [next(rows) for _ in range(plan.accumulation)]
        expected = plan.positions(rank, step, np.arange(plan.rows_per_step)).reshape(plan.accumulation, -1)
        for got, want in zip(micro, expected, strict=True):
            if not np.array_equal(got["position"], want):
                raise RuntimeError(f"step {step}: rank {rank} read positions {got['position']}, not {want}")
        bad.update(int(i) for m in micro for i in m["index"][~m["ok"]])
        batches = [rows_to_batch(m, device) for m in micro]
        # (scored tokens, summed loss, skipped rows, tokens through the LLM, rows cut at max_text) of the
        # whole global batch
        totals = torch.tensor(
            [
                sum(float(b["scored"][:, 1:].sum()) for b in batches),
                0.0,
                float(sum((~m["ok"]).sum() for m in micro)),
                float(sum(_sequence_tokens(model, b["text_lengths"]) for b in batches)),
                float(sum(m["cut"].sum() for m in micro)),
            ]
        )
        _all_reduce(totals[:1], world)
        tokens = totals[0].clamp(min=1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.lr, cfg.steps)
        opt.zero_grad(set_to_none=True)
        # the step's extra terms first, accumulated without syncing
        if facts is not None:  # this worker's share of the step's questions over several images
            with quiet():
                with autocast:
                    part, tokens_read = _multi_image_loss(
                        model, cfg, config["source"], facts, step, rank, world
                    )
                (part * world).backward()
            totals[1] += part.detach().float().cpu()
            totals[3] += tokens_read
        nce = None
        if cfg.contrastive:
            with quiet():
                with autocast:
                    nce, tokens_read = _contrastive_loss(model, cfg, config["source"], step, rank, world)
                (cfg.contrastive * nce * world).backward()
            if rank == 0:  # every worker holds the whole term
                totals[1] += cfg.contrastive * nce.detach().float().cpu()
            totals[3] += tokens_read
        for k, b in enumerate(batches):
            scored = b.pop("scored")
            with contextlib.nullcontext() if k == len(batches) - 1 else quiet():
                with autocast:
                    if config["features"] is None:  # else the data stage read them from the cache
                        b.update(frozen_inputs(model, b["pixels"], cfg.freeze_vision))
                    logits, _ = ddp(**b, text_attends_visual=upper)
                    part = answer_loss(logits, b["input_ids"], scored, over=tokens)
                # DDP averages gradients over workers: scaled by `world`, they sum to the global mean's
                (part * world).backward()
            totals[1] += part.detach().float().cpu()
        if scaling.fsdp:
            sync_replicated(replicated, world)
            clip_grad_norm(params, cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if scaling.fsdp and cfg.multi_rows:
            release_layers(model)
        _all_reduce(totals[1:], world)
        step += 1
        seconds = time.perf_counter() - step_started
        log.append(
            {
                "step": step,
                "loss": float(totals[1]),
                "skipped_rows": int(totals[2]),
                "cut_rows": int(totals[4]),
            }
        )
        if nce is not None:
            log[-1]["nce"] = float(nce)
        entry = {
            **log[-1],
            "lr": opt.param_groups[0]["lr"],
            "tokens": int(totals[3]),
            "scored_tokens": int(totals[0]),
            "seconds": seconds,
            "tokens_per_s": float(totals[3]) / seconds,
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log[-1]["minutes"] = (time.perf_counter() - started) / 60  # since this worker started
            metrics: dict[str, Any] = dict(log[-1])
            metrics["bad_images"] = _count_distinct(bad, world)
            whole = full_state(model, opt) if scaling.fsdp else None  # every worker takes part
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    kept, kept_opt = (model, opt) if whole is None else plain_copy(model, cfg, *whole)
                    if val is not None:
                        metrics["val_accuracy"] = log[-1]["val_accuracy"] = _validate(
                            kept, frozen_modules(kept, cfg), val, upper
                        )
                    logger.info("step %d: %s", step, json.dumps(metrics))
                    save_training_state(Path(folder), kept, kept_opt, step, log)
                    # the run's config beside the weights: a checkpoint says how it was trained
                    (Path(folder) / RUN_RECORD).write_text(json.dumps(config["record"], indent=2))
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved)
            entry.update({k: metrics[k] for k in ("bad_images", "val_accuracy") if k in metrics})
        if rank == 0:
            config["steps"].put(entry)


def _multi_image_loss(
    model: HTCVLM,
    cfg: TrainConfig,
    source: ProceduralSource,
    facts: SourceFacts,
    step: int,
    rank: int,
    world: int,
) -> tuple[torch.Tensor, int]:
    """The step's multi-image rows, drawn as the single-process trainer draws them (`step_rng`,
    `draw_rows`), every worker drawing all of them and running every `world`-th: this worker's part of
    their loss (a sum over the step's scored answer tokens), and the tokens it ran through the LLM. Its
    images are rendered here, a few hundred a step at most, with the frozen parts' outputs."""
    rows = draw_rows(
        model,
        facts,
        cfg.multi_rows,
        cfg.multi_images,
        step_rng(cfg, step, "multi"),
        cfg.multi_step_images,
        cfg.multi_kinds,
    )
    mine = rows.take(range(rank, len(rows), world))
    if not len(mine):
        return torch.zeros((), device=model.device, requires_grad=True), 0
    unique = sorted({i for q in mine.questions for i in q.images})
    local = {image: at for at, image in enumerate(unique)}
    pool = tensorize(model, source.samples(np.array(unique), model.config.image_size))
    frozen = frozen_inputs(model, pool.pixels.float().to(model.device) / 255.0, cfg.freeze_vision)
    pool.quantized, pool.patches = frozen.get("quantized"), frozen.get("patches")
    mine.questions = [replace(q, images=tuple(local[i] for i in q.images)) for q in mine.questions]
    ids, logits, scored = multi_image_logits(model, pool, mine)
    loss = answer_loss(logits, ids, scored, over=torch.tensor(float(rows.scored_tokens)))
    return loss, len(unique) * model.layout.text_position + int((ids != model.tokenizer.pad_token_id).sum())


def _contrastive_loss(
    model: HTCVLM, cfg: TrainConfig, source: Source, step: int, rank: int, world: int
) -> tuple[torch.Tensor, int]:
    """The step's InfoNCE over two views of `cfg.contrastive_images` images, drawn as the single-process
    trainer draws it (`step_rng`, `contrastive.view_pairs`), and the tokens this worker ran through the
    LLM. Every worker renders the images and augments every view (the generator's order), runs the
    views of every `world`-th image and adds the others' latents, without gradients, by one all-reduce.
    Each worker's term is the whole InfoNCE, differentiable through its own latents: the gradients of
    the workers sum to the InfoNCE's gradient. Unreadable images (LLaVA data) are left out."""
    rng = step_rng(cfg, step, "contrastive")
    picks = rng.sample(range(len(source)), cfg.contrastive_images)
    samples = [s for s in source.samples(np.array(picks), model.config.image_size) if s is not None]
    if len(samples) < 2:  # nothing to tell apart
        return torch.zeros((), device=model.device, requires_grad=True), 0
    views = view_pairs(model, list(tensorize(model, samples).pixels), rng)
    mine = torch.arange(rank, len(samples), world, device=model.device)
    rows = torch.stack([2 * mine, 2 * mine + 1], dim=1).flatten()
    local = view_latents(model, views[rows], cfg.freeze_vision)
    latents = torch.zeros(len(views), local.shape[-1], device=local.device, dtype=local.dtype)
    latents[rows] = local.detach()
    _all_reduce(latents, world)  # each row is written by one worker: the sum is every latent
    latents = latents.index_put((rows,), local)  # this worker's rows with their gradients
    return info_nce(latents[0::2], latents[1::2]), len(rows) * model.layout.text_position


def _sequence_tokens(model: HTCVLM, text_lengths: torch.Tensor) -> int:
    """Tokens a micro-batch runs through the LLM: each row's prefix [S; V_hy; sep; voco] and its text
    (padding not counted); text_lengths (B, K) as `rows_to_batch` gives them."""
    return len(text_lengths) * model.layout.text_position + int(text_lengths.sum())


def _validate(model: HTCVLM, frozen: list[torch.nn.Module], val: VQATensors, upper: bool) -> float:
    """Accuracy on `val` through the product path, then back to training mode (frozen parts in eval)."""
    model.eval()
    result = accuracy(model, val, upper=upper)["all"]
    model.train()
    for module in frozen:
        module.eval()
    return result


def _all_reduce(values: torch.Tensor, world: int) -> None:
    if world > 1:
        torch.distributed.all_reduce(values)


def _count_distinct(indices: set[int], world: int) -> int:
    """Distinct bad sample indices over every worker."""
    if world == 1:
        return len(indices)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, sorted(indices))
    return len({i for part in gathered for i in part})


def _val_pool(model: HTCVLM, source: Source, size: int) -> VQATensors:
    """The validation samples, tensorized in rank 0 (small: `size` of them); unreadable images left out."""
    if isinstance(source, ProceduralSource):
        return procedural_pool(model, "val", size)
    samples = [s for s in source.samples(np.arange(len(source)), model.config.image_size) if s is not None]
    return tensorize(model, samples)


def run_distributed(
    out: Path,
    scaling: Scaling,
    variant: Variant = "hybrid",
    preset: str = "tiny",
    cfg: TrainConfig = RECIPES["tiny"],
    mgvq_from: Path | None = None,
    llava: tuple[Path, Path] | None = None,
    init_from: Path | None = None,
    **config_overrides: object,
) -> dict[str, Any]:
    """`onetoken train --workers N`: stages 1 and 0 here (as `run_training` runs them) into out/start,
    unless a previous run left it there; then stage 2 on Ray Train. Returns the last reported metrics."""
    out.mkdir(parents=True, exist_ok=True)
    start = out / "start"
    if not (start / "training.json").is_file():  # written after the weights: a complete start
        device = "cuda" if scaling.gpus_per_worker else "cpu"
        run_training(
            start,
            variant,
            preset,
            replace(cfg, steps=0),
            mgvq_from,
            device,
            llava,
            init_from,
            **config_overrides,
        )
    # run_training may have unfrozen a tower nothing trained: keep its choice
    cfg = replace(
        cfg, freeze_vision=json.loads((start / "training.json").read_text())["train"]["freeze_vision"]
    )
    source: Source
    val: Source
    if llava is None:
        source = ProceduralSource(cfg.pool, cfg.easy, cfg.questions, cfg.easy_steps, cfg.batch_size, cfg.seed)
        val = ProceduralSource(cfg.val_size, 0, 1, 0, cfg.batch_size, cfg.seed)
    else:
        data = read_llava(*llava, on_missing="skip")
        if len(data.turns) <= cfg.val_size:
            raise ValueError(
                f"{llava[0]} has {len(data.turns)} turns with images, need more than {cfg.val_size}"
            )
        # every conversation about an image trains after one prefix; held-out turns validate each alone
        source = LlavaSource(by_image(conversations(data.turns[: -cfg.val_size])), cfg.batch_size, cfg.seed)
        val = LlavaSource(tuple(((turn,),) for turn in data.turns[-cfg.val_size :]), cfg.batch_size, cfg.seed)
        logger.info("%s: %d image files missing, left out", llava[0], len(data.missing))
    record = run_record(
        variant,
        preset,
        init_from,
        config_overrides,
        cfg,
        scaling=asdict(scaling),
        missing_images=0 if llava is None else len(data.missing),
        resumed_from_step=latest_step((out / "ray").resolve()),
    )
    metrics = fit_stage2(start, out, cfg, source, scaling, variant, val, record)
    if not math.isfinite(metrics.get("loss", 0.0)):
        logger.warning("the last loss is %s", metrics.get("loss"))
    return metrics
