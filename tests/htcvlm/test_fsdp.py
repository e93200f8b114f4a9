"""FSDP's pieces (htcvlm/train/fsdp.py) on two real gloo processes, without Ray: a step with the decoder
layers sharded is the single process's step, and the whole weights and moments gathered from the shards
are the single process's, also when the run resumed from saved moments. The Ray Train run with
`Scaling(fsdp=True)` is tested in test_distributed.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.train.fsdp import (
    clip_grad_norm,
    decoder_layers,
    full_state,
    is_sharded,
    moments_by_name,
    plain_copy,
    shard_layers,
    sync_replicated,
)
from htcvlm.train.recipe import TrainConfig
from htcvlm.train.stages import stage2_optimizer, stage2_parameters

from .helpers import make_model

CFG = TrainConfig.from_name("tiny", lr=1e-3, grad_clip=0.05)  # clipping on: the norm counts every shard


def _loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(3, 3, 64, 64, generator=g)
    ids = torch.randint(5, 200, (3, 9), generator=g)
    logits, _ = model(pixels, ids, torch.tensor([9, 7, 5]))
    return logits.float().logsumexp(-1).mean()


def _step(model, opt, params, seed: int, world: int, rank: int = 0) -> None:
    """One step of the mean loss of two batches: a worker's own (`world`), or both (the single process)."""
    opt.zero_grad(set_to_none=True)
    if world:  # the workers' gradients are averaged
        _loss(model, 10 * seed + rank).backward()
    else:
        ((_loss(model, 10 * seed) + _loss(model, 10 * seed + 1)) / 2).backward()
    if world:
        sync_replicated([p for p in params if not is_sharded(p)], world)
        clip_grad_norm(params, CFG.grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_(params, CFG.grad_clip)
    opt.step()


def _flat(moments) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": v.float() for name, slot in moments.items() for key, v in slot.items()}


def _worker(rank: int, world: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = load_pretrained(folder).train()
        opt = stage2_optimizer(model, CFG)
        _step(model, opt, stage2_parameters(model, CFG), 1, 0)  # moments to resume from, unsharded
        opt = shard_layers(model, opt, CFG)
        layer = decoder_layers(model)[0]
        assert all(is_sharded(p) for p in layer.parameters()) and not is_sharded(model.voco)
        assert next(iter(layer.parameters())).to_local().shape[0] < next(iter(layer.parameters())).shape[0]
        for seed in (2, 3):
            _step(model, opt, stage2_parameters(model, CFG), seed, world, rank)
        weights, moments = full_state(model, opt)
        if rank == 0:
            save_file(weights, f"{folder}/sharded_weights.safetensors")
            save_file(_flat(moments), f"{folder}/sharded_moments.safetensors")
            plain, plain_opt = plain_copy(model, CFG, weights, moments)
            save_file(_flat(moments_by_name(plain, plain_opt)), f"{folder}/plain_moments.safetensors")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    folder = tmp_path_factory.mktemp("fsdp")
    save_pretrained(make_model(tokenizer), folder)
    mp.spawn(_worker, args=(2, str(folder), _free_port()), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same sums in the same order
    try:
        model = load_pretrained(folder).train()
        opt = stage2_optimizer(model, CFG)
        for seed in (1, 2, 3):
            _step(model, opt, stage2_parameters(model, CFG), seed, 0)
    finally:
        torch.set_num_threads(threads)
    return folder, model, opt


def test_sharded_steps_after_a_resume_reach_the_single_process_weights(runs):
    folder, model, _ = runs
    sharded = load_file(str(folder / "sharded_weights.safetensors"))
    state = model.state_dict()
    assert sharded.keys() == state.keys()
    moved = 0
    for name, value in state.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved += name.startswith("llm.model.layers.")
    assert moved > 10


def test_the_gathered_moments_are_the_single_process_moments(runs):
    folder, model, opt = runs
    single = _flat(moments_by_name(model, opt))
    for kept in ("sharded_moments", "plain_moments"):
        gathered = load_file(str(folder / f"{kept}.safetensors"))
        assert gathered.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(gathered[key], value, rtol=1e-5, atol=1e-7, msg=key)
