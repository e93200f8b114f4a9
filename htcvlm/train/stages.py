"""The three training stages, in the order a run takes them.

- stage 1, `train_mgvq`: the MGVQ tokenizer on reconstruction + commitment loss, then frozen
- stage 0, `train_vision`: the vision tower on per-cell scene labels (the tiny model's stand-in for CLIP)
- stage 2, `train_vlm`: HTC-VLM under M_hy on the answer tokens (Eq. 9)
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from htcvlm.data.multi import ImageFacts, facts_of_cells
from htcvlm.data.scenes import GRID
from htcvlm.evaluate import accuracy
from htcvlm.mgvq import MGVQ
from htcvlm.model import HTCVLM
from htcvlm.pool import CELL_CLASSES, VQATensors, map_batches
from htcvlm.train.contrastive import contrastive_loss
from htcvlm.train.data import batch_indices
from htcvlm.train.loop import load_training_state, run_steps, save_training_state
from htcvlm.train.multi import draw_rows, multi_image_logits, multi_image_upper_logits
from htcvlm.train.recipe import TrainConfig, Variant

logger = logging.getLogger(__name__)


def answer_loss(
    logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor, over: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 9: cross-entropy on the answer tokens (and EOS) only, the positions `scored` (B, T) marks;
    logits row t predicts token t + 1. The mean over this batch's scored tokens, or the sum divided by
    `over`: the scored tokens of a whole step when this batch is one part of it (distributed training)."""
    targets = ids[:, 1:]
    weights = scored[:, 1:].flatten().to(logits.dtype)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (losses * weights).sum() / (weights.sum() if over is None else over)


def train_mgvq(
    model: HTCVLM, pixels_u8: torch.Tensor, cfg: TrainConfig, show_progress: bool = True
) -> dict[str, float]:
    """Stage 1: the tokenizer on reconstruction + commitment loss. Returns the final loss parts."""
    mgvq: MGVQ = model.mgvq
    mgvq.train()
    opt = torch.optim.AdamW(mgvq.parameters(), lr=cfg.mgvq_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, float] = {}

    def loss_at(step: int) -> tuple[torch.Tensor, dict[str, str]]:
        nonlocal parts
        idx = torch.randint(len(pixels_u8), (cfg.batch_size,), generator=gen)
        loss, parts = mgvq.loss(pixels_u8[idx].float().to(model.device) / 255.0)
        return loss, {"rec": f"{parts['reconstruction']:.4f}", "vq": f"{parts['commitment']:.4f}"}

    run_steps(
        opt,
        loss_at,
        cfg=cfg,
        lr=cfg.mgvq_lr,
        steps=cfg.mgvq_steps,
        desc="stage 1 mgvq",
        show_progress=show_progress,
    )
    mgvq.eval()
    return parts


class CellHeads(torch.nn.Module):
    """Stage 0's heads, discarded after it: each cell's attributes from the patch tokens pooled over the
    cell (local), and every cell's attributes from the mean of all patch tokens (global: the kind of
    summary the voco token has to make)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.classes = list(CELL_CLASSES.values())
        self.local = torch.nn.Linear(width, sum(self.classes))
        self.glob = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width),
            torch.nn.GELU(),
            torch.nn.Linear(4 * width, GRID * GRID * sum(self.classes)),
        )

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """patches (B, N, w) on a square grid -> {"local", "global"}: (B, 9, sum(classes)) logits."""
        b, n, w = patches.shape
        side = math.isqrt(n)
        grid = patches.transpose(1, 2).reshape(b, w, side, side)  # (B, N, w) -> (B, w, side, side)
        pooled = F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)  # (B, 9, w)
        glob = self.glob(patches.mean(dim=1)).view(b, GRID * GRID, -1)  # (B, 9 * sum) -> (B, 9, sum)
        return {"local": self.local(pooled), "global": glob}

    def loss(self, patches: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """patches (B, N, w); labels (B, 9, 4)."""
        total = patches.new_zeros(())
        for logits in self(patches).values():
            for col, part in enumerate(logits.split(self.classes, dim=-1)):
                total = total + F.cross_entropy(
                    part.flatten(0, 1), labels[..., col].flatten(), ignore_index=-1
                )
        return total


def train_vision(
    model: HTCVLM,
    data: VQATensors,
    cfg: TrainConfig,
    show_progress: bool = True,
    val: VQATensors | None = None,
) -> float:
    """Stage 0: the vision tower on per-cell scene labels. The paper starts from a pretrained CLIP; the
    tiny model's tower starts from scratch, and the answer loss alone teaches it shapes far too slowly.
    Returns the final loss; logs the heads' accuracy on `val`."""
    if data.cells is None:
        raise ValueError("stage 0 needs per-cell labels: procedural data only")
    heads = CellHeads(model.config.vision.hidden_size).to(model.device)
    params = list(model.vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    cells = data.cells
    model.vision.train()

    def loss_at(step: int) -> tuple[torch.Tensor, dict[str, str]]:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        pixels = data.pixels[idx].float().to(model.device) / 255.0
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = heads.loss(model.vision_patches(pixels), cells[idx].to(model.device))
        return loss, {"loss": f"{loss.item():.3f}"}

    loss = run_steps(
        opt,
        loss_at,
        cfg=cfg,
        lr=cfg.vision_lr,
        steps=cfg.vision_steps,
        desc="stage 0 vision",
        clip=params,
        show_progress=show_progress,
    )
    model.vision.eval()
    if val is not None and val.cells is not None:
        logger.info("stage 0 validation accuracy: %s", json.dumps(cell_accuracy(model, heads, val)))
    return 0.0 if loss is None else loss.item()


@torch.no_grad()
def cell_accuracy(model: HTCVLM, heads: CellHeads, data: VQATensors) -> dict[str, dict[str, float]]:
    """Per head and attribute, the share of occupied grid cells labelled right: how well the tower sees
    what the questions ask about."""
    assert data.cells is not None
    labels = data.cells.to(model.device)
    occupied = labels[..., 0] > 0
    patches = map_batches(lambda x: model.vision_patches(x.to(model.device)), data.pixels, 256)
    result: dict[str, dict[str, float]] = {}
    for head, logits in heads(patches.to(model.device)).items():
        result[head] = {}
        for col, (name, part) in enumerate(
            zip(CELL_CLASSES, logits.split(heads.classes, dim=-1), strict=True)
        ):
            right = (part.argmax(-1) == labels[..., col]) & occupied
            result[head][name] = round(float(right.sum() / occupied.sum()), 4)
    return result


def frozen_modules(model: HTCVLM, cfg: TrainConfig) -> list[torch.nn.Module]:
    """What stage 2 keeps fixed: the MGVQ tokenizer (fitted by stage 1), and the vision tower if asked."""
    frozen = [model.mgvq] if model.has_mgvq else []
    return frozen + ([model.vision] if cfg.freeze_vision and model.has_vision else [])


def stage2_parameters(model: HTCVLM, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Every parameter but those of the frozen modules and those frozen by hand (an LLM under LoRA)."""
    frozen = {id(p) for m in frozen_modules(model, cfg) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen and p.requires_grad]


def stage2_optimizer(model: HTCVLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """Freeze `frozen_modules`; AdamW over the rest, weight decay on matrices only."""
    for module in frozen_modules(model, cfg):
        module.requires_grad_(False)
    params = stage2_parameters(model, cfg)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


def multi_image_facts(data: VQATensors, cfg: TrainConfig) -> list[ImageFacts] | None:
    """The pool's images as multi-image questions see them, when the recipe asks for such rows."""
    if not cfg.multi_rows:
        return None
    if data.cells is None:
        raise ValueError("multi-image rows need per-cell scene labels: procedural data only")
    return facts_of_cells(data.cells)


def step_rng(cfg: TrainConfig, step: int, what: str) -> random.Random:
    """A step's own generator for `what` it draws: a resumed run draws what an unbroken one would."""
    return random.Random(f"{what}/{cfg.seed}/{step}")


def train_vlm(
    model: HTCVLM,
    data: VQATensors,
    cfg: TrainConfig,
    variant: Variant,
    out: Path | None = None,
    val: VQATensors | None = None,
    show_progress: bool = True,
) -> list[dict[str, float]]:
    """Stage 2: the autoregressive answer loss under M_hy (or under plain causal attention for `upper`).

    Resumes from `out` when it holds a training state. Returns the log of (step, loss, val accuracy).
    """
    params = stage2_parameters(model, cfg)
    frozen = frozen_modules(model, cfg)
    opt = stage2_optimizer(model, cfg)
    start, log = (0, []) if out is None else load_training_state(out, model, opt)
    model.train()
    for module in frozen:
        module.eval()  # no statistics to update, but keep them deterministic
    if model.has_mgvq and data.quantized is None:
        data.quantize(model)
    if cfg.freeze_vision and model.has_vision and data.patches is None:
        data.encode_patches(model)
    if cfg.grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    upper = variant == "upper"
    started = time.perf_counter()

    facts = multi_image_facts(data, cfg)

    def loss_at(step: int) -> tuple[torch.Tensor, dict[str, str]]:
        idx = batch_indices(data, step, cfg)
        b = {k: v.to(model.device) if v is not None else None for k, v in data.batch(idx).items()}
        scored = b.pop("scored")
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, _ = model(**b, text_attends_visual=upper)
            loss = answer_loss(logits, b["input_ids"], scored)
            shown = {"loss": f"{loss.item():.3f}"}
            if facts is not None:
                rng = step_rng(cfg, step, "multi")
                rows = draw_rows(
                    model,
                    facts,
                    cfg.multi_rows,
                    cfg.multi_images,
                    rng,
                    cfg.multi_step_images,
                    cfg.multi_kinds,
                )
                multi_ids, multi_logits, multi_scored = (
                    multi_image_upper_logits if upper else multi_image_logits
                )(model, data, rows)
                multi = answer_loss(multi_logits, multi_ids, multi_scored)
                shown["multi"] = f"{multi.item():.3f}"
                loss = loss + multi
            if cfg.contrastive:
                rng = step_rng(cfg, step, "contrastive")
                nce = contrastive_loss(model, data, cfg.contrastive_images, rng, cfg.freeze_vision)
                shown["nce"] = f"{nce.item():.3f}"
                loss = loss + cfg.contrastive * nce
        return loss, shown

    def validate(step: int, loss: torch.Tensor) -> None:
        """Every cfg.eval_every steps and after the last: accuracy on `val`, logged, and the state saved."""
        if val is None or ((step + 1) % cfg.eval_every and step + 1 != cfg.steps):
            return
        model.eval()
        acc = accuracy(model, val, upper=upper)["all"]
        model.train()
        for module in frozen:
            module.eval()
        entry = {
            "step": step + 1,
            "loss": loss.item(),
            "val_accuracy": acc,
            "minutes": (time.perf_counter() - started) / 60,
        }
        log.append(entry)
        logger.info("%s step %d loss %.3f val %.3f", variant, step + 1, loss.item(), acc)
        tqdm.write(json.dumps(entry))
        if out is not None:
            save_training_state(out, model, opt, step + 1, log)

    run_steps(
        opt,
        loss_at,
        cfg=cfg,
        lr=cfg.lr,
        steps=cfg.steps,
        desc=f"stage 2 {variant}",
        clip=params,
        start=start,
        after_step=validate,
        show_progress=show_progress,
    )
    model.eval()
    if out is not None:
        save_training_state(out, model, opt, cfg.steps, log)
    return log
