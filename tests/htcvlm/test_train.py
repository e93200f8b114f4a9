"""Training and evaluation: the answer-only loss, learning, resume, retention and the CLI smoke run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.data import dataset as dataset_module
from htcvlm.data.dataset import ProceduralVQA
from htcvlm.data.scenes import COLORS, GRID, SHAPES
from htcvlm.evaluate import accuracy, retention, retention_table
from htcvlm.pool import cell_labels, tensorize
from htcvlm.train.data import batch_indices, llava_pools, step_rows
from htcvlm.train.loop import _load_state, _state_tensors
from htcvlm.train.recipe import TrainConfig
from htcvlm.train.run import init_weights
from htcvlm.train.stages import CellHeads, answer_loss, cell_accuracy, train_vision, train_vlm
from llm_worker.cli import main

from .helpers import LLAVA, QUESTIONS, make_model


def test_loss_counts_answer_tokens_only():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0]])  # prompt 5 6 7, answer 8 9, one pad
    scored = torch.tensor([[False, False, False, True, True, False]])
    logits = torch.randn(1, 6, 12)
    base = answer_loss(logits, ids, scored)
    changed = logits.clone()
    changed[0, :2] = torch.randn(2, 12)  # rows predicting prompt tokens 6 and 7
    changed[0, 5] = torch.randn(12)  # the pad row
    assert torch.equal(answer_loss(changed, ids, scored), base)
    changed[0, 3] = torch.randn(12)  # the row predicting answer token 9
    assert not torch.equal(answer_loss(changed, ids, scored), base)


def test_a_small_model_fits_a_small_set(tokenizer):
    model = make_model(tokenizer, seed=0)
    data = ProceduralVQA("train", 8)
    pool = tensorize(model, [data[i] for i in range(8)])
    cfg = TrainConfig(steps=80, batch_size=8, lr=3e-3, warmup=5, eval_every=1000, freeze_vision=False)
    with torch.no_grad():
        before = _loss(model, pool).item()
    train_vlm(model, pool, cfg, "hybrid", show_progress=False)
    with torch.no_grad():
        after = _loss(model, pool).item()
    assert after < 0.2 * before, (before, after)


def test_stage2_is_the_recipe_written_out_step_by_step(tokenizer):
    """train_vlm against stage 2 as docs/TRAINING.md states it, written out here: AdamW (β 0.9/0.98,
    weight decay on matrices only), linear warm-up then cosine to lr * min_lr_ratio, gradient clipping,
    the first easy_steps batches drawn from the single-object rows, the MGVQ and the tower frozen. The
    same weights, bit for bit: a refactor of the loop must not change what it computes."""
    data = ProceduralVQA("train", 12, questions=2)
    model = make_model(tokenizer, seed=0)
    by_hand = copy.deepcopy(model)
    pool = tensorize(model, [data[i] for i in range(12)])
    pool.n_easy = 4  # the last 4 rows stand for the single-object samples
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup=2, easy_steps=2, grad_clip=0.5, seed=3)
    assert cfg.freeze_vision
    train_vlm(model, pool, cfg, "hybrid", show_progress=False)

    frozen = ("mgvq.", "vision.")  # pool.quantized and pool.patches are their outputs, computed once
    params = [p for name, p in by_hand.named_parameters() if not name.startswith(frozen)]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    by_hand.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    for step in range(cfg.steps):
        if step < cfg.warmup:
            lr = cfg.lr * (step + 1) / cfg.warmup
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / (cfg.steps - cfg.warmup)))
            lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)
        for group in opt.param_groups:
            group["lr"] = lr
        if step < cfg.easy_steps:
            idx = 8 + torch.randint(4, (cfg.batch_size,), generator=gen)
        else:
            idx = torch.randint(12, (cfg.batch_size,), generator=gen)
        batch = pool.batch(idx)
        scored = batch.pop("scored")
        loss = answer_loss(by_hand(**batch)[0], batch["input_ids"], scored)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    trained, written_out = model.state_dict(), by_hand.state_dict()
    assert all(torch.equal(trained[k], written_out[k]) for k in trained)
    assert not torch.equal(trained["voco"], make_model(tokenizer, seed=0).voco)  # it did train


def _drawn_in_sequence(seed, steps, batch, n, n_easy, easy_steps):
    """Each step's rows as one generator gives them step after step, the single-object ones (the
    pool's last n_easy) for the first easy_steps: the order `step_rows` must replay."""
    gen = torch.Generator().manual_seed(seed * 1000)
    return [
        n - n_easy + torch.randint(n_easy, (batch,), generator=gen)
        if s < easy_steps
        else torch.randint(n, (batch,), generator=gen)
        for s in range(steps)
    ]


class _Stopped(Exception):
    """A run stopped from outside mid-way (as a killed process is)."""


def test_a_resumed_stage2_draws_the_rows_of_an_unbroken_one_and_ends_on_its_weights(
    tokenizer, tmp_path, monkeypatch
):
    """Stopped after its checkpoint at step 3 of 6 and run again, stage 2 draws steps 3..5 as an
    unbroken run does (not a generator seeded afresh at the resumed step) and ends on the same weights."""
    data = ProceduralVQA("train", 12, questions=2)
    pool = tensorize(make_model(tokenizer, seed=0), [data[i] for i in range(12)])
    pool.n_easy = 4
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup=2, easy_steps=2, eval_every=3, seed=5)
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    unbroken.mkdir(), resumed.mkdir()
    train_vlm(make_model(tokenizer, seed=0), pool, cfg, "hybrid", out=unbroken, val=pool, show_progress=False)

    drawn: list[tuple[int, list[int]]] = []
    stops = [4]

    def stop_at_4(data, step, cfg):
        if stops and step == stops[0]:
            stops.pop()
            raise _Stopped
        rows = batch_indices(data, step, cfg)
        drawn.append((step, rows.tolist()))
        return rows

    monkeypatch.setattr("htcvlm.train.stages.batch_indices", stop_at_4)
    with pytest.raises(_Stopped):
        train_vlm(
            make_model(tokenizer, seed=0), pool, cfg, "hybrid", out=resumed, val=pool, show_progress=False
        )
    assert json.loads((resumed / "train_state.json").read_text())["step"] == 3
    drawn.clear()
    train_vlm(make_model(tokenizer, seed=0), pool, cfg, "hybrid", out=resumed, val=pool, show_progress=False)
    assert [s for s, _ in drawn] == [3, 4, 5]
    sequence = _drawn_in_sequence(cfg.seed, 6, 4, 12, 4, 2)
    assert [rows for _, rows in drawn] == [sequence[s].tolist() for s in (3, 4, 5)]
    a, b = load_pretrained(unbroken).state_dict(), load_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_rows_is_a_pure_function_of_its_step():
    """Asked in any order, again, or after another order's draws, a step gets the rows the generator
    gives it drawing step after step from 0."""
    sequence = _drawn_in_sequence(7, 30, 3, 100, 10, 4)
    for step in (0, 29, 5, 5, 4, 28, 3, 12, 29, 0):
        assert torch.equal(step_rows(7, step, 3, 100, 10, 4), sequence[step])
        step_rows(8, step, 3, 100, 10, 4)  # another order in between
    with pytest.raises(ValueError, match="no rows to draw"):
        step_rows(7, -1, 3, 100, 10, 4)
    with pytest.raises(ValueError, match="no rows to draw"):
        step_rows(7, 0, 3, 0)


def _inputs(pool):
    batch = pool.batch(torch.arange(len(pool)))
    batch.pop("scored")
    return batch


def _loss(model, pool):
    return answer_loss(model(**_inputs(pool))[0], pool.ids, pool.scored)


def test_packed_questions_score_as_each_question_alone(tokenizer):
    """K questions packed after one image give each question the logits it has alone (its own positions,
    the voco token, itself), and the packed loss is the answer tokens' mean over all of them."""
    model = make_model(tokenizer, seed=0).eval()
    data = ProceduralVQA("train", 3, questions=3)
    samples = [data[i] for i in range(3)]
    assert all(len(s.more) == 2 for s in samples)
    packed = tensorize(model, samples)
    assert packed.segments.shape == (3, 3) and torch.equal(packed.lengths, packed.segments.sum(1))
    for upper in (False, True):
        with torch.no_grad():
            logits = model(**_inputs(packed), text_attends_visual=upper)[0]
        for k in range(3):
            alone = tensorize(
                model,
                [
                    dataclasses.replace(s, question=s.more[k - 1][0][0], answer=s.more[k - 1][0][1], more=())
                    if k
                    else dataclasses.replace(s, more=())
                    for s in samples
                ],
            )
            with torch.no_grad():
                single = model(**_inputs(alone), text_attends_visual=upper)[0]
            for i in range(3):
                start = int(packed.segments[i, :k].sum())
                n = int(alone.lengths[i])
                assert torch.equal(packed.ids[i, start : start + n], alone.ids[i, :n])
                assert torch.equal(packed.scored[i, start : start + n], alone.scored[i, :n])
                torch.testing.assert_close(logits[i, start : start + n], single[i, :n], atol=1e-5, rtol=1e-5)


# LLaVA-1.5's chat template: a later turn has a text of its own ("USER: …"), read right after the answer
# before it; the tiny model's template (None) asks every turn as its first.
CHAT = dataclasses.replace(LLAVA, next_prompt="USER: {question} ASSISTANT:")
TURNS = ((QUESTIONS[0], "a circle"), (QUESTIONS[1], "red"), (QUESTIONS[2], "two, both small"))
SECOND = (("color?", "blue"), ("size?", "small"))  # another conversation about the same image


@pytest.mark.parametrize("layout", [None, CHAT], ids=["tiny", "chat"])
def test_packed_conversations_give_each_turn_its_logits_after_its_history(tokenizer, layout):
    """A conversation's turns packed after one compressed image, and a second conversation about the same
    image after it (another LLaVA entry of that image): turn k has the logits it has in an unpacked row of
    turns 0..k alone, so it reads the voco token, the shared prefix and the earlier turns of its own
    conversation as the chat template lays them out, never the other conversation's; and the loss scores
    exactly every turn's answer tokens and the EOS that ends each."""
    model = make_model(tokenizer, seed=0, **({} if layout is None else {"layout": layout})).eval()
    data = ProceduralVQA("train", 2)
    (q0, a0), *later = TURNS
    samples = [
        dataclasses.replace(data[i], question=q0, answer=a0, follow_ups=tuple(later), more=(SECOND,))
        for i in range(2)
    ]
    packed = tensorize(model, samples)
    assert packed.segments.shape == (2, 2)  # the conversation, then the second one
    with torch.no_grad():
        logits = model(**_inputs(packed))[0]
    for k in range(len(TURNS)):
        history = tensorize(
            model, [dataclasses.replace(s, follow_ups=tuple(later[:k]), more=()) for s in samples]
        )
        with torch.no_grad():
            alone = model(**_inputs(history))[0]
        for i in range(2):
            n = int(history.lengths[i])  # turns 0..k: the packed conversation's first n tokens
            assert torch.equal(packed.ids[i, :n], history.ids[i, :n])
            assert torch.equal(packed.scored[i, :n], history.scored[i, :n])
            torch.testing.assert_close(logits[i, :n], alone[i, :n], atol=1e-5, rtol=1e-5)
    (q1, a1), follow = SECOND[0], SECOND[1:]
    second = tensorize(
        model, [dataclasses.replace(s, question=q1, answer=a1, follow_ups=follow, more=()) for s in samples]
    )
    with torch.no_grad():
        alone = model(**_inputs(second))[0]
    for i in range(2):
        start, n = int(packed.segments[i, 0]), int(second.lengths[i])
        assert int(packed.segments[i, 1]) == n
        assert torch.equal(packed.ids[i, start : start + n], second.ids[i, :n])
        torch.testing.assert_close(logits[i, start : start + n], alone[i, :n], atol=1e-5, rtol=1e-5)
    # the earlier turns are read: another first answer changes the later turns' logits
    other = tensorize(model, [dataclasses.replace(s, answer="a square", more=()) for s in samples])
    with torch.no_grad():
        changed = model(**_inputs(other))[0]
    tail = slice(int(other.lengths[0]) - 5, int(other.lengths[0]))
    assert not torch.allclose(
        changed[0, tail], logits[0, int(packed.segments[0, 0]) - 5 : int(packed.segments[0, 0])]
    )
    # scored: each answer's tokens and its EOS, nothing of a prompt
    eos, length = tokenizer.eos_token_id, int(packed.lengths[0])
    ids, scored = packed.ids[0, :length], packed.scored[0, :length]
    answers = [a for _, a in (*TURNS, *SECOND)]
    # a byte-level BPE has no dummy prefix: each answer is " answer" as tokenized alone
    expected = [[*tokenizer(f" {a}", add_special_tokens=False).input_ids, eos] for a in answers]
    assert ids[scored].tolist() == [t for answer in expected for t in answer]
    assert (ids[scored] == eos).sum() == len(answers) and not (ids[~scored] == eos).any()
    prompts = [model.layout.prompt_text(q, turn) for turn, (q, _) in enumerate(TURNS)]
    prompts += [model.layout.prompt_text(q, turn) for turn, (q, _) in enumerate(SECOND)]
    assert tokenizer.decode(ids[~scored]) == "".join(prompts)
    if layout is not None:
        assert prompts[1].startswith("USER: ") and not prompts[0].startswith("USER: ")


def test_optimizer_state_round_trips_without_pickle(tokenizer):
    model = make_model(tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.voco.sum().backward()
    opt.step()
    tensors, meta = _state_tensors(opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _load_state(fresh, tensors, json.loads(json.dumps(meta)))
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_retention():
    assert retention(0.8, 0.3, 0.9) == pytest.approx(5 / 6)
    assert math.isnan(retention(0.5, 0.5, 0.5))
    acc = {"color": 0.9, "shape": 0.6, "semantic": 0.6, "detail": 0.9, "all": 0.75}
    low = {"color": 0.3, "shape": 0.2, "semantic": 0.2, "detail": 0.3, "all": 0.25}
    mid = {"color": 0.6, "shape": 0.4, "semantic": 0.4, "detail": 0.6, "all": 0.5}
    markdown, table = retention_table({"upper": acc, "lower": low, "hybrid": mid})
    assert table["hybrid"]["color"]["retention"] == pytest.approx(0.5)
    assert table["hybrid"]["avg_retention"]["retention"] == pytest.approx(0.5)
    assert "| hybrid |" in markdown and "50.0%" in markdown


def test_cli_smoke_train_resume_eval_and_analyze(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--pool", "24", "--easy", "8", "--val-size", "8", "--mgvq-steps", "2", "--batch-size", "4"]
    common += ["--eval-every", "2", "--vision-steps", "2"]
    assert main(["train", "--out", str(out), "--steps", "2", *common]) == 0
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    assert main(["train", "--out", str(out), "--steps", "4", *common]) == 0  # resumes at step 2
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 4 and [e["step"] for e in state["log"]] == [2, 4]
    # stage 0 trained the tower, so stage 2 kept it frozen (the default), and the resumed run too
    assert json.loads((out / "training.json").read_text())["train"]["freeze_vision"] is True
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert main(["eval", f"upper={out}", f"hybrid={out}", "--test-size", "12", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "eval.json").read_text())["table"]
    assert set(table) == {"upper", "lower", "hybrid"}
    assert main(["eval", f"hybrid={out}", "--test-size", "12"]) == 0  # no upper: accuracy alone
    assert "| hybrid |" in capsys.readouterr().out
    for spec, says in (("hybrid", "NAME=DIR"), ("=x", "NAME=DIR"), (f"lower={out}", "under compression")):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", spec])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    png = tmp_path / "attention.png"
    assert main(["analyze", "attention", "--model", str(out), "--images", "4", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    assert "anchors hold" in capsys.readouterr().out
    assert main(["retrieval", "--model", str(out), "--procedural", "10"]) == 0
    printed = capsys.readouterr().out
    assert "scikit-image photos (25)" in printed and "recall@10" in printed and "pooled" in printed
    figures = tmp_path / "multi.json"
    assert main(["eval-multi", "--model", str(out), "--ks", "2", "--per-kind", "2"]) == 0
    assert "| 2 | " in capsys.readouterr().out
    upper = ["eval-multi", "--model", str(out), "--ks", "2", "8", "--per-kind", "2", "--upper"]
    assert main([*upper, "--out", str(figures)]) == 0  # 8 images of 68 tokens do not fit 512 positions
    assert "| 8 | beyond the context" in capsys.readouterr().out
    result = json.loads(figures.read_text())
    assert result["upper"] is True and "k=2/all" in result["accuracy"] and "k=8/all" not in result["accuracy"]


def test_onetoken_train_is_the_tiny_recipe_with_the_flags_given(tmp_path, monkeypatch):
    """The CLI holds no second copy of the recipe: without flags it trains TrainConfig.from_name("tiny")
    on the preset's model; each flag changes its one field and nothing else."""
    import htcvlm.train.run as run_module

    calls = []
    monkeypatch.setattr(run_module, "run_training", lambda out, **kwargs: calls.append(kwargs))
    assert main(["train", "--out", str(tmp_path)]) == 0
    flags = ["--steps", "7", "--no-freeze-vision", "--questions", "2", "--bf16", "--fusion", "post"]
    flags += ["--multi-kinds", "find", "find", "count"]
    assert main(["train", "--out", str(tmp_path), *flags]) == 0
    default, changed = calls
    tiny = TrainConfig.from_name("tiny")
    assert default["cfg"] == tiny and (default["variant"], default["preset"]) == ("hybrid", "tiny")
    assert not {"n_discrete", "fusion"} & default.keys()  # the model preset's own values
    assert changed["cfg"] == dataclasses.replace(
        tiny, steps=7, freeze_vision=False, questions=2, bf16=True, multi_kinds=("find", "find", "count")
    )
    assert changed["fusion"] == "post" and "n_discrete" not in changed


def test_cli_prepares_stages_0_and_1_once_for_variants_trained_from_it(tmp_path):
    """`--steps 0` stops after the tokenizer and the tower; variants start stage 2 from it with several
    questions packed per image, and keep its frozen tower and MGVQ."""
    from safetensors.torch import load_file

    prep, run = tmp_path / "prep", tmp_path / "run"
    common = ["--pool", "24", "--easy", "8", "--val-size", "8", "--batch-size", "4", "--eval-every", "2"]
    assert (
        main(
            ["train", "--out", str(prep), "--steps", "0", "--mgvq-steps", "2", "--vision-steps", "2", *common]
        )
        == 0
    )
    assert (prep / "model.safetensors").is_file() and not (prep / "train_state.json").exists()
    args = ["--init-from", str(prep), "--vision-steps", "0", "--questions", "3", "--steps", "2", *common]
    assert main(["train", "--out", str(run), "--variant", "continuous", *args]) == 0
    recorded = json.loads((run / "training.json").read_text())
    assert recorded["train"]["questions"] == 3 and recorded["train"]["freeze_vision"] is True
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "bad"), "--questions", "0"])
    assert exit_.value.code == 2
    before, after = load_file(str(prep / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("vision."))
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("llm."))


def test_cli_trains_on_llava_format_data(tmp_path):
    """Non-square photos of any size, multi-turn conversations: the real-scale data path end to end, and
    the logged validation accuracy is the product path's on the held-out turns."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    entries = []
    for i in range(12):
        Image.effect_noise((80 + 4 * i, 50), 30 + i).convert("RGB").save(tmp_path / "img" / f"{i}.jpg")
        turns = [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "noise"},
            {"from": "human", "value": "Is it bright?"},
            {"from": "gpt", "value": "yes" if i % 2 else "no"},
        ]
        entries.append({"id": str(i), "image": f"img/{i}.jpg", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--llava", str(tmp_path / "data.json"), "--image-root", str(tmp_path)]
    args += ["--steps", "30", "--eval-every", "15", "--lr", "3e-3", "--warmup", "2", "--val-size", "4"]
    assert main([*args, "--mgvq-steps", "1", "--batch-size", "4"]) == 0
    # no cell labels, so no stage 0: a from-scratch tower is not frozen untrained, whatever the default
    assert json.loads((out / "training.json").read_text())["train"]["freeze_vision"] is False
    log = json.loads((out / "train_state.json").read_text())["log"]
    assert [e["step"] for e in log] == [15, 30]
    model = load_pretrained(out)
    _, val = llava_pools(model, tmp_path / "data.json", tmp_path, val_size=4)
    assert val.answers == ["noise", "no", "noise", "yes"]  # the last 4 turns: images 10 and 11
    assert log[-1]["val_accuracy"] == accuracy(model, val)["all"]
    # half the held-out turns ask what every training image answers: 30 steps learn that
    assert log[-1]["val_accuracy"] >= 0.5, log


def test_cell_labels_name_each_cell():
    data = ProceduralVQA("train", 4)
    scenes = [data[i].scene for i in range(4)]
    labels = cell_labels(scenes)
    assert labels.shape == (4, GRID * GRID, 4)
    for scene, row in zip(scenes, labels, strict=True):
        occupied = {o.cell for o in scene.objects}
        assert {c for c in range(GRID * GRID) if row[c, 0] > 0} == occupied
        for o in scene.objects:
            assert SHAPES[int(row[o.cell, 0]) - 1] == o.shape and list(COLORS)[row[o.cell, 1]] == o.color
        assert (row[[c for c in range(GRID * GRID) if c not in occupied], 1:] == -1).all()


def test_stage0_learns_cell_labels_and_touches_only_the_vision_tower(tokenizer):
    data = ProceduralVQA("train", 32)
    losses = []
    for steps in (1, 60):
        torch.manual_seed(0)
        model = make_model(tokenizer, seed=0)
        pool = tensorize(model, [data[i] for i in range(32)])
        pool.cells = cell_labels([data[i].scene for i in range(32)])
        llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
        vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
        cfg = TrainConfig(batch_size=16, vision_steps=steps, vision_lr=3e-3, warmup=5)
        losses.append(train_vision(model, pool, cfg, show_progress=False))
        assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm_before.items())
        assert not all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision_before.items())
    assert losses[1] < 0.6 * losses[0], losses


def test_init_weights_copies_every_matching_tensor(tokenizer, tmp_path):
    upper = make_model(tokenizer, seed=1)
    save_pretrained(upper, tmp_path)
    continuous = make_model(tokenizer, seed=2, channels="continuous")
    copied = init_weights(continuous, tmp_path)
    assert copied == len(continuous.state_dict())  # upper holds every continuous tensor
    assert torch.equal(continuous.llm.lm_head.weight, upper.llm.lm_head.weight)
    assert torch.equal(continuous.voco, upper.voco)


def test_the_vision_bypass_gives_the_same_logits(tokenizer):
    model = make_model(tokenizer, seed=0).eval()
    data = ProceduralVQA("train", 4)
    batch = _inputs(tensorize(model, [data[i] for i in range(4)]))
    with torch.no_grad():
        direct = model(**batch)[0]
        bypassed = model(**{**batch, "patches": model.vision_patches(batch["pixels"])})[0]
    assert torch.equal(direct, bypassed)


def test_a_frozen_tower_stays_put_and_the_rest_still_learns(tokenizer):
    model = make_model(tokenizer, seed=0)
    data = ProceduralVQA("train", 8)
    pool = tensorize(model, [data[i] for i in range(8)])
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    cfg = TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=5, eval_every=1000, freeze_vision=True)
    with torch.no_grad():
        before = _loss(model, pool).item()
    train_vlm(model, pool, cfg, "hybrid", show_progress=False)
    assert pool.patches is not None and pool.patches.shape[:2] == (8, model.config.n_patches)
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision_before.items())
    pool.patches = None  # score through the tower itself: the cached features were its output
    with torch.no_grad():
        after = _loss(model, pool).item()
    assert after < 0.5 * before, (before, after)


def test_cell_accuracy_scores_occupied_cells_only(tokenizer, monkeypatch):
    model = make_model(tokenizer, seed=0)
    data = ProceduralVQA("train", 6)
    pool = tensorize(model, [data[i] for i in range(6)])
    pool.cells = cell_labels([data[i].scene for i in range(6)])
    heads = CellHeads(model.config.vision.hidden_size)

    def oracle(patches, wrong_empty=False):  # one-hot logits of the true labels (empty cells: class 0)
        parts = [
            F.one_hot(pool.cells[..., col].clamp(min=0), n).float() for col, n in enumerate(heads.classes)
        ]
        if wrong_empty:  # call every empty cell a circle and give it a color: must not count
            parts[0] = torch.where(
                pool.cells[..., :1] > 0, parts[0], F.one_hot(torch.tensor(1), parts[0].shape[-1])
            )
        logits = torch.cat(parts, dim=-1)
        return {"local": logits, "global": logits}

    monkeypatch.setattr(heads, "forward", oracle)
    perfect = cell_accuracy(model, heads, pool)
    assert perfect == {
        h: dict.fromkeys(("shape", "color", "size", "texture"), 1.0) for h in ("local", "global")
    }
    monkeypatch.setattr(heads, "forward", lambda p: oracle(p, wrong_empty=True))
    assert cell_accuracy(model, heads, pool) == perfect


def test_parallel_rendering_gives_the_same_samples(monkeypatch):
    monkeypatch.setattr(dataset_module, "PARALLEL_MIN", 0)
    data = ProceduralVQA("val", 24)
    alone, parallel = data.render_all(workers=1), data.render_all(workers=2)
    for a, b in zip(alone, parallel, strict=True):
        assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
        assert a.image.tobytes() == b.image.tobytes()
