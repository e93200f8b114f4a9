"""Small models and images shared by the model-core tests."""

from __future__ import annotations

import io

import torch
from PIL import Image

from htcvlm.config import HTCConfig, LayoutConfig, LLMConfig, MGVQConfig, VisionConfig
from htcvlm.model import HTCVLM, new_model

QUESTIONS = [
    "What shape is the object on the left?",
    "Color?",
    "How many striped objects are in this picture, counting the small ones too?",
]

SYSTEM = "You are a helpful assistant."
LLAVA = LayoutConfig(
    bos=True,
    system=SYSTEM,
    before_image="{system} USER: ",
    prompt="{question} ASSISTANT:",
    stop_tokens=("</s>",),
)
VOCO_LLAMA = LayoutConfig(
    bos=True,
    system=SYSTEM,
    separator=" \n",  # two tokens here, as LLaMA's "▁" "\n"
    prompt="\n{system} USER: {question} ASSISTANT:",
    text_attends_prefix=False,
    stop_tokens=("</s>",),
)


def small_config(**overrides) -> HTCConfig:
    """The tiny preset made smaller still: exactness does not depend on width, only on structure."""
    base = HTCConfig.from_name("tiny")
    return base.with_(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=16),
        llm=LLMConfig(
            hidden_size=64,
            intermediate_size=128,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            vocab_size=300,
            max_position_embeddings=256,
        ),
        pd_hidden=64,
        **overrides,
    )


def make_model(tokenizer, seed: int = 0, never_eos: bool = False, **overrides) -> HTCVLM:
    """A small random-weights model. `never_eos`: EOS's logit is held at exactly 0, below the max of ~300
    random logits with certainty in practice, so every answer runs its full length (longer comparisons)."""
    torch.manual_seed(seed)
    model = new_model(small_config(**overrides), tokenizer).eval()
    if never_eos:
        with torch.no_grad():
            model.llm.lm_head.weight[tokenizer.eos_token_id] = 0.0
    return model


def sharpened(model):
    """Random weights give logits of about 0.6 and flat attention, where a wrong rotary phase or a wrong
    key moves logits by only ~1e-3: queries, keys and logits x4 make that ~1e-2, four orders of magnitude
    over the exact path's ~1e-6."""
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.llm.lm_head.weight.mul_(4.0)
    return model


def png_bytes(seed: int, size: int = 64, mode: str = "RGB") -> bytes:
    gen = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@torch.inference_mode()
def greedy_with_joins(
    model: HTCVLM, records, prompts, n_tokens: int, join_after: dict[int, int]
) -> list[list[int]]:
    """Greedy decoding of `n_tokens` per row where row 0 starts alone and row r joins the running batch
    after step `join_after[r]` (its own prefill, then joined to the running rows); finished rows leave."""
    from htcvlm.decode import RunningBatch
    from htcvlm.generation import GenerationOptions

    options = GenerationOptions(max_new_tokens=n_tokens)
    running = RunningBatch(model)
    request_of = dict(zip(running.admit(records[:1], prompts[:1], [options]), [0], strict=True))
    got: list[list[int]] = [[] for _ in records]
    for step in range(n_tokens + max(join_after.values()) + 1):
        if len(running):
            events, failed = running.step()
            assert not failed, failed
            for event in events:
                got[request_of[event.row]].append(event.token_id)
        for new in (r for r, after in join_after.items() if after == step):
            (row_id,) = running.admit(records[new : new + 1], prompts[new : new + 1], [options])
            request_of[row_id] = new
    return got


# The published MGVQ architecture (DC-AE encoder) at small widths: two residual stages, then two attention
# stages (1 and 2 heads); the golden tensors in tests/htcvlm/fixtures were made at this geometry.
SMALL_DCAE = MGVQConfig(
    encoder="dcae",
    downsample=16,
    latent_channels=16,
    groups=4,
    codebook_size=256,
    stage_widths=(16, 32, 32, 64),
    stage_depths=(2, 2, 2, 1),
    attention_stages=2,
)
