"""LoRA adapters on the LLM for stage 2 (`peft`), merged back before a model is saved for serving.

- `add_adapters`: LoRA on every attention and MLP projection of `model.llm`, in place; the LLM's own
  weights (embeddings and head included) stop training, P_v, P_d and the voco token train on
- `merge_adapters`: fold each adapter into its base weight and put the plain layer back, so the state
  dict has exactly the keys of a model that never had adapters and serving needs no adapter code

A training checkpoint keeps the adapters unmerged (a resumed run goes on training them); only the final
model is merged. `peft` is imported inside the functions: a dev extra, needed only to train with LoRA.
"""

from __future__ import annotations

from htcvlm.model import HTCVLM

# LLaMA's projections: attention and MLP
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_adapters(model: HTCVLM, rank: int, alpha: float | None = None) -> None:
    """LoRA of rank `rank` (scale alpha / rank, alpha = 2 * rank by default) on the LLM's projections.
    The adapters' B starts at zero, so the model computes what it did before."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.llm.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=list(TARGETS))
    inject_adapter_in_model(config, model.llm)  # marks only the adapters trainable inside model.llm


def has_adapters(model: HTCVLM) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.llm.modules())


def merge_adapters(model: HTCVLM) -> None:
    """W += scale * B @ A for every adapter, then each LoRA layer replaced by its plain base layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.llm.get_submodule(parent_name) if parent_name else model.llm
            setattr(parent, child, module.get_base_layer())
