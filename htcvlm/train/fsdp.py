"""FSDP for stage 2 on Ray Train (`onetoken train --workers N --fsdp`), for LLMs whose full fine-tune
does not fit one GPU (7B in AdamW and fp32 master weights: about 112 GB).

What is sharded: every decoder layer of the LLM (`fully_shard`, torch's FSDP2). Its weights, gradients
and AdamW moments live 1/N on each worker; a layer's whole weights are gathered for its forward and
again for its backward. At paper scale these layers hold 6.5B of Vicuna-7B's 6.7B weights. What stays
whole on every worker: the embeddings and LM head, P_d, P_v, the voco token, and the frozen CLIP and
MGVQ. Their gradients are averaged by one all-reduce a step (`sync_replicated`), as DDP would.

Why the layers, not the whole model under one FSDP root: the training pass runs the model through more
than its `forward` (compression for multi-image rows, decoding's placement, the contrastive latents),
and FSDP gathers a module's weights only when its `forward` runs. Every decoder layer always runs
through its `forward`, whichever path calls it.

Checkpoints stay whole: `full_state` gathers the weights and moments on every worker, and rank 0
writes them from an ordinary model and AdamW (`plain_copy`), as the single process does. So a run
resumes with or without FSDP, on any number of workers, and the checkpoint serves as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from htcvlm.model import HTCVLM
from htcvlm.train.recipe import TrainConfig
from htcvlm.train.stages import stage2_optimizer

Moments = dict[str, dict[str, torch.Tensor]]  # AdamW's state by parameter name


def decoder_layers(model: HTCVLM) -> nn.ModuleList:
    """The LLM's decoder layers (`model.llm.model.layers`, as every Hugging Face decoder names them)."""
    layers = getattr(getattr(model.llm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--fsdp shards an LLM's decoder layers; {type(model.llm).__name__} has none")
    return layers


def moments_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> Moments:
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(p)]: dict(opt.state[p])
        for group in opt.param_groups
        for p in group["params"]
        if p in opt.state
    }


def set_moments(model: nn.Module, opt: torch.optim.Optimizer, moments: Moments) -> None:
    """Give `opt` the state `moments` names, each tensor laid out as its parameter is (whole, or its
    shard: every worker holds the whole tensor, so each keeps its own part without communication)."""
    params = dict(model.named_parameters())
    for name, slot in moments.items():
        param = params[name]
        opt.state[param] = {key: _laid_out_as(param, value) for key, value in slot.items()}


def _laid_out_as(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor) and value.shape == param.shape:  # a DTensor's shape is the whole one
        value = value.to(param.device_mesh.device_type)
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def shard_layers(model: HTCVLM, opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.AdamW:
    """Shard the LLM's decoder layers over the process group; returns the AdamW over the sharded
    parameters, holding what `opt` held (the moments of a resumed run).

    A layer's whole weights are freed after its forward and gathered again for its backward, which
    FSDP starts when a gradient reaches the layer's output. Multi-image rows also differentiate through
    keys and values an earlier pass left in its cache, a gradient that enters a layer without passing
    its output. So with `cfg.multi_rows` each layer keeps its gathered weights from its first forward
    to the end of the step (`release_layers` frees them after the optimizer step). Gradients and
    moments stay sharded; the weights are whole for the step, as in ZeRO-2."""
    moments = moments_by_name(model, opt)
    keep = bool(cfg.multi_rows)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=not keep)
        if keep:
            layer.set_reshard_after_backward(False)
    sharded = stage2_optimizer(model, cfg)
    set_moments(model, sharded, moments)
    return sharded


def release_layers(model: HTCVLM) -> None:
    """Free the layers' gathered weights (stale after an optimizer step): the next forward gathers the
    updated shards."""
    for layer in decoder_layers(model):
        layer.reshard()


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor)


@torch.no_grad()
def sync_replicated(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of the parameters every worker holds whole, in one all-reduce (a
    parameter a worker's share of the step did not reach contributes zeros)."""
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for param, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        param.grad = part.view_as(param).to(param.dtype)


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over whole and sharded gradients together: the shards' squares
    are summed over the workers, the whole ones counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    shards = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    square = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in shards:
        square += g.float().pow(2).sum()
    if shards and torch.distributed.is_initialized():
        torch.distributed.all_reduce(square)
    for g in whole:
        square += g.float().pow(2).sum()
    total = square.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in shards + whole:
        g.mul_(scale.to(g.dtype))
    return total


@torch.no_grad()
def full_state(model: HTCVLM, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Moments]:
    """The whole weights and AdamW moments, on the CPU. A collective: every worker calls it, and the
    shards are gathered in one order (the state dict's, then the parameters')."""
    weights = {name: _whole(t) for name, t in model.state_dict().items()}
    moments = {
        name: {key: _whole(value) for key, value in slot.items()}
        for name, slot in moments_by_name(model, opt).items()
    }
    return weights, moments


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def plain_copy(
    like: HTCVLM, cfg: TrainConfig, weights: dict[str, torch.Tensor], moments: Moments
) -> tuple[HTCVLM, torch.optim.AdamW]:
    """An ordinary model and AdamW on the CPU holding `full_state`'s tensors (no copy of them): what
    `save_training_state` writes and validation runs on."""
    with torch.device("meta"):
        plain = HTCVLM(like.config, like.tokenizer)
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.materialize_buffers("cpu")
    opt = stage2_optimizer(plain, cfg)
    set_moments(plain, opt, moments)
    return plain, opt
