"""Evaluation: exact-match answer accuracy per question type and kind, and the retention table.

Compressed variants are evaluated through the product's own path: compress() once per image, then
decode() from the records. The upper bound answers with every visual token in view.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from htcvlm.data.multi import MULTI_QTYPES, MultiQuestion, facts_of_cells, multi_question
from htcvlm.data.questions import KIND_OF, QTYPES
from htcvlm.decode import decode
from htcvlm.generation import GenerationOptions
from htcvlm.model import HTCVLM
from htcvlm.pool import VQATensors, procedural_pool

logger = logging.getLogger(__name__)

MAX_ANSWER_TOKENS = 6


@torch.inference_mode()
def predict(model: HTCVLM, data: VQATensors, upper: bool = False, batch_size: int = 128) -> list[str]:
    out: list[str] = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        pixels = data.pixels[idx].float().to(model.device) / 255.0
        questions = [data.questions[i] for i in idx.tolist()]
        if upper:
            out += _greedy_uncompressed(model, pixels, questions)
        else:
            records = model.compress_pixels(pixels, [f"{i:064x}" for i in idx.tolist()])
            answers = decode(model, records, questions, GenerationOptions(max_new_tokens=MAX_ANSWER_TOKENS))
            out += [a.text for a in answers]
    return out


def _greedy_uncompressed(model: HTCVLM, pixels: torch.Tensor, questions: list[str]) -> list[str]:
    """Greedy answers with text attending all visual tokens (no cache: answers are a few tokens)."""
    pad = model.tokenizer.pad_token_id

    def next_logits(rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        lengths = torch.tensor([len(r) for r in rows], device=model.device)
        logits, _ = model(pixels, ids, lengths, text_attends_visual=True)
        return logits[torch.arange(len(rows)), lengths - 1]

    return _greedy(model, [model.prompt_ids(q) for q in questions], next_logits)


def _greedy(
    model: HTCVLM, prompts: list[list[int]], next_logits: Callable[[list[list[int]]], torch.Tensor]
) -> list[str]:
    """Greedy answers: `next_logits(rows)` gives the logits (B, vocab) after each row's last token; every
    row is rerun with what it generated until it stops or has MAX_ANSWER_TOKENS."""
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(MAX_ANSWER_TOKENS):
        nxt = next_logits([p + g for p, g in zip(prompts, generated, strict=True)]).argmax(-1).tolist()
        for i, token in enumerate(nxt):
            if done[i]:
                continue
            if token in model.stop_ids:
                done[i] = True
            else:
                generated[i].append(token)
        if all(done):
            break
    return [model.tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


def accuracy(model: HTCVLM, data: VQATensors, upper: bool = False) -> dict[str, float]:
    """Exact-match accuracy: 'all', each qtype present, and each kind ('semantic', 'detail')."""
    predictions = predict(model, data, upper=upper)
    hits: dict[str, list[bool]] = defaultdict(list)
    for pred, answer, qtype in zip(predictions, data.answers, data.qtypes, strict=True):
        ok = pred == answer
        hits["all"].append(ok)
        hits[qtype].append(ok)
        if qtype in KIND_OF:
            hits[KIND_OF[qtype]].append(ok)
    return {key: sum(v) / len(v) for key, v in hits.items()}


def multi_image_set(
    model: HTCVLM, ks: Sequence[int], per_kind: int, pool_size: int = 2000, seed: int = 0
) -> tuple[VQATensors, list[MultiQuestion]]:
    """Test-split scenes and `per_kind` questions of each multi-image kind for every k in `ks`."""
    pool = procedural_pool(model, "test", pool_size)
    assert pool.cells is not None
    facts = facts_of_cells(pool.cells)
    rng = random.Random(f"multi-eval/{seed}")
    questions = [
        multi_question(facts, k, qtype, rng) for k in ks for qtype in MULTI_QTYPES for _ in range(per_kind)
    ]
    return pool, questions


@torch.inference_mode()
def multi_image_accuracy(
    model: HTCVLM,
    pool: VQATensors,
    questions: Sequence[MultiQuestion],
    batch_size: int = 64,
    upper: bool = False,
) -> dict[str, float]:
    """Exact-match accuracy through the product path: every image compressed once, each question decoded
    from its images' records in order; or, `upper`, answered greedily with every image token in view
    (`htcvlm.train.multi.uncompressed_logits`). Keys: "k=K/qtype", "k=K/all" and "all"."""
    answers = (_multi_greedy_uncompressed if upper else _multi_decoded)(model, pool, questions, batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, answer in zip(questions, answers, strict=True):
        for key in (f"k={len(q.images)}/{q.qtype}", f"k={len(q.images)}/all", "all"):
            hits[key].append(answer == q.answer)
    return {key: sum(v) / len(v) for key, v in hits.items()}


def _multi_decoded(
    model: HTCVLM, pool: VQATensors, questions: Sequence[MultiQuestion], batch_size: int
) -> list[str]:
    used = sorted({i for q in questions for i in q.images})
    records = {}
    for start in range(0, len(used), 256):
        chunk = used[start : start + 256]
        pixels = pool.pixels[chunk].float().to(model.device) / 255.0
        records.update(zip(chunk, model.compress_pixels(pixels, [f"{i:064x}" for i in chunk]), strict=True))
    options = GenerationOptions(max_new_tokens=MAX_ANSWER_TOKENS)
    answers = []
    for start in range(0, len(questions), batch_size):
        part = questions[start : start + batch_size]
        rows = [[records[i] for i in q.images] for q in part]
        answers += [a.text for a in decode(model, rows, [q.text for q in part], options)]
    return answers


def _multi_greedy_uncompressed(
    model: HTCVLM, pool: VQATensors, questions: Sequence[MultiQuestion], batch_size: int
) -> list[str]:
    """Greedy answers of the uncompressed pass over each question's images (no cache: a few tokens)."""
    from htcvlm.train.multi import uncompressed_logits

    def next_logits(prefixes: torch.Tensor, images: list[list[int]], rows: list[list[int]]) -> torch.Tensor:
        logits, lengths = uncompressed_logits(model, prefixes, images, rows)
        return logits[torch.arange(len(rows)), lengths - 1]

    answers = []
    for start in range(0, len(questions), batch_size):
        part = questions[start : start + batch_size]
        used = sorted({i for q in part for i in q.images})
        slot_of = {image: at for at, image in enumerate(used)}
        prefixes, _ = model.prefix_embeds(pool.pixels[used].float().to(model.device) / 255.0)
        images = [[slot_of[i] for i in q.images] for q in part]
        prompts = [model.prompt_ids(q.text) for q in part]
        answers += _greedy(model, prompts, functools.partial(next_logits, prefixes, images))
    return answers


def multi_image_table(result: Mapping[str, float], ks: Sequence[int]) -> str:
    """Markdown: accuracy % per k and kind, with the chance level of each (a uniform guess); a k missing
    from `result` is one whose images the context cannot hold."""
    chance = {"count": lambda k: 1 / (k + 1), "find": lambda k: 1 / k, "compare": lambda k: 0.5}
    lines = ["| k | " + " | ".join(MULTI_QTYPES) + " | all |", "|---|" + "---|" * (len(MULTI_QTYPES) + 1)]
    for k in ks:
        if f"k={k}/all" not in result:
            lines.append(f"| {k} | " + " | ".join(["beyond the context"] * len(MULTI_QTYPES)) + " | |")
            continue
        cells = [f"{100 * result[f'k={k}/{q}']:.1f} ({100 * chance[q](k):.0f})" for q in MULTI_QTYPES]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {100 * result[f'k={k}/all']:.1f} |")
    return "\n".join(lines)


def retention(result: float, lower: float, upper: float) -> float:
    """(R - LB) / (UB - LB), the paper's Table 1 measure; NaN when the bounds coincide."""
    return (result - lower) / (upper - lower) if upper != lower else float("nan")


def retention_table(results: Mapping[str, Mapping[str, float]]) -> tuple[str, dict]:
    """Markdown table and JSON of accuracy and retention per column (qtypes, kinds, all) per variant.

    `results` maps variant name -> accuracy dict. Retention needs both 'upper' and 'lower'; without
    them the table gives accuracy alone.
    """
    first = results.get("upper") or next(iter(results.values()))
    columns = [q for q in QTYPES if q in first] + ["semantic", "detail", "all"]
    bounded = "upper" in results and "lower" in results
    table: dict[str, dict[str, dict[str, float]]] = {}
    lines = [
        "| variant | " + " | ".join(columns) + " | avg retention |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for name, acc in results.items():
        row: dict[str, dict[str, float]] = {}
        cells = []
        rets = []
        shown = bounded and name not in ("upper", "lower")  # a bound's retention says nothing
        for col in columns:
            r = retention(acc[col], results["lower"][col], results["upper"][col]) if bounded else float("nan")
            row[col] = {"accuracy": acc[col], "retention": r}
            cells.append(f"{100 * acc[col]:.1f}" + (f" ({100 * r:.0f}%)" if shown else ""))
            if col in QTYPES and r == r:
                rets.append(r)
        avg = sum(rets) / len(rets) if rets else float("nan")
        row["avg_retention"] = {"retention": avg}
        table[name] = row
        avg_cell = f"{100 * avg:.1f}%" if shown else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg_cell} |")
    return "\n".join(lines), table


def run_eval(models: Mapping[str, str], test_size: int = 1000, out: Path | None = None) -> tuple[str, dict]:
    """Evaluate checkpoints by variant name on the procedural test split. An 'upper' model also gives the
    lower bound (its weights through the voco bottleneck) and with it each variant's retention."""
    from htcvlm.checkpoint import load_pretrained

    if "lower" in models:
        raise ValueError(
            "'lower' is not a model to pass: it is the 'upper' model's weights under compression"
        )
    results: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        model = load_pretrained(path)
        test = procedural_pool(model, "test", test_size)
        if name == "upper":
            results["upper"] = accuracy(model, test, upper=True)
            results["lower"] = accuracy(model, test, upper=False)
        else:
            results[name] = accuracy(model, test)
        logger.info("%s: %s", name, results[name] if name != "upper" else results["upper"])
    markdown, table = retention_table(results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.md").write_text(markdown + "\n")
        (out / "eval.json").write_text(
            json.dumps({"test_size": test_size, "models": dict(models), "table": table}, indent=2)
        )
    return markdown, table
