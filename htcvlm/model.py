"""HTC-VLM (Algorithm 1): the dual-channel encoder, the `<voco>` bottleneck and the LLM.

compress() runs once per image: V_hy = [v_d; V] and the voco token(s) go through the LLM under M_hy, and
only the voco tokens' final hidden state and key/value state are kept (a `Record`). forward() is the full
masked pass over [S; V_hy; sep; voco; W] (S the shared prefix and sep the separator of the checkpoint's
layout, both empty for the tiny model), used for training and as the reference that decode() must match.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from htcvlm.components import build_llm, build_vision, constructed_buffer
from htcvlm.config import HTCConfig
from htcvlm.images import DEFAULT_MAX_PIXELS, pixels_from_bytes
from htcvlm.layout import SequenceLayout, resolve_layout
from htcvlm.mask import text_segments
from htcvlm.mgvq import MGVQ
from htcvlm.record import Record, image_id_of

logger = logging.getLogger(__name__)

# Per layer (keys, values), each (B, kv_heads, length, head_dim), keys after the rotary embedding.
KVState = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class DiscreteProjector(nn.Module):
    """P_d of Eq. 4: v_d = GELU(W2 GELU(W1 q)), reshaped into N_d anchor tokens."""

    def __init__(self, q_dim: int, hidden: int, n_tokens: int, d: int) -> None:
        super().__init__()
        self.n_tokens, self.d = n_tokens, d
        self.w1 = nn.Linear(q_dim, hidden)
        self.w2 = nn.Linear(hidden, n_tokens * d)
        self.act = nn.GELU()

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out = self.act(self.w2(self.act(self.w1(q))))
        return out.view(q.shape[0], self.n_tokens, self.d)  # (B, N_d * d) -> (B, N_d, d)


def _continuous_projector(kind: str, d_in: int, d: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d)
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))  # LLaVA-1.5's mlp2x_gelu


def voco_state(cache: DynamicCache, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The voco tokens' keys and values out of a pass's cache, stacked as records hold them: per layer
    (B, kv_heads, L, head_dim) -> (B, layers, kv_heads, n_voco, head_dim) each."""
    voco = slice(layout.voco_position, layout.text_position)
    keys = torch.stack([layer.keys[:, :, voco] for layer in cache.layers], dim=1)
    values = torch.stack([layer.values[:, :, voco] for layer in cache.layers], dim=1)
    return keys, values


def new_model(config: HTCConfig, tokenizer: PreTrainedTokenizerBase) -> HTCVLM:
    """A freshly initialised model whose LLM vocabulary is exactly the tokenizer's."""
    if config.llm.path is None:
        config = config.with_(llm=replace(config.llm, vocab_size=len(tokenizer)))
    return HTCVLM(config, tokenizer)


class HTCVLM(nn.Module):
    def __init__(self, config: HTCConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.layout: SequenceLayout = resolve_layout(config, tokenizer)
        self.llm = build_llm(config, tokenizer)
        d = self.llm.config.hidden_size
        if config.channels != "discrete":
            self.vision = build_vision(config)
            self.proj_v = _continuous_projector(config.projector, self.vision.config.hidden_size, d)
            for name, value in self._normalization().items():
                self.register_buffer(name, value, persistent=False)
        if config.channels != "continuous":
            self.mgvq = MGVQ(config.mgvq)
        if config.channels == "hybrid":
            self.proj_d = DiscreteProjector(config.q_dim, config.pd_hidden, config.n_discrete, d)
        if config.channels == "discrete":
            # The paper's discrete-only ablation: every MGVQ latent position becomes one token.
            self.proj_q = nn.Linear(config.mgvq.latent_channels, d)
        self.voco = nn.Parameter(torch.randn(config.n_voco, d) * self.llm.config.initializer_range)
        self._fingerprint: tuple[tuple[tuple[int, int], ...], str] | None = None  # (weights_version, hash)
        self._shared_state: tuple[tuple[tuple[int, int], ...], KVState] | None = None  # (weights_version, kv)

    def _normalization(self) -> dict[str, torch.Tensor]:
        """The vision tower's input statistics, (1, 3, 1, 1) each."""
        vc = self.config.vision
        return {
            "clip_mean": torch.tensor(vc.image_mean).view(1, 3, 1, 1),
            "clip_std": torch.tensor(vc.image_std).view(1, 3, 1, 1),
        }

    def materialize_buffers(self, device: torch.device | str) -> list[str]:
        """Give every buffer still on the meta device the value its constructor computes, on `device`.

        A model built on the meta device and loaded with `load_state_dict(assign=True)` has every weight,
        but no non-persistent buffer: the state dict holds none. Returns the names set; a buffer with no
        known constructor value is a ValueError, never a tensor of zeros or garbage.
        """
        done = []
        for prefix, module in self.named_modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if not buffer.is_meta:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                value = (
                    self._normalization().get(name) if module is self else constructed_buffer(module, name)
                )
                if value is None:
                    raise ValueError(
                        f"no constructor value known for buffer {full} ({type(module).__name__})"
                    )
                setattr(module, name, value.to(device))  # stays a buffer, persistence unchanged
                done.append(full)
        return done

    @property
    def has_vision(self) -> bool:
        """Whether the model has a vision tower (every channel mode but discrete-only)."""
        return self.config.channels != "discrete"

    @property
    def has_mgvq(self) -> bool:
        """Whether the model has the MGVQ tokenizer (every channel mode but continuous-only)."""
        return self.config.channels != "continuous"

    # ---- the two channels and their fusion (Eq. 3-5) ----

    def vision_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the tower's normalized input (what CLIPImageProcessor returns)."""
        return (pixels - self.clip_mean) / self.clip_std

    def vision_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, N, d_vision): the tower's selected patch tokens, before P_v."""
        out = self.vision(pixel_values=self.vision_input(pixels), output_hidden_states=True)
        return out.hidden_states[self.config.vision.select_layer][:, 1:]  # drop CLS

    def continuous_tokens(self, pixels: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """V of Eq. 3: (B, 3, S, S) in [0, 1] -> (B, N, d), the selected layer's patch tokens projected.

        `patches` (B, N, d_vision) skips the tower: a trainer whose tower is frozen computes them once.
        """
        return self.proj_v(self.vision_patches(pixels) if patches is None else patches)

    def discrete_tokens(
        self, pixels: torch.Tensor, quantized: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v_d of Eq. 4 (B, N_d, d) in hybrid mode, or (B, h*w, d) in discrete-only mode; and the VQ loss.

        `quantized` (B, C, h, w) skips the tokenizer: a trainer whose MGVQ is frozen computes it once.
        """
        loss = pixels.new_zeros(())
        if quantized is None:
            quant = self.mgvq.encode(pixels)
            quantized, loss = quant.quantized, quant.loss
        if self.config.channels == "discrete":
            # (B, C, h, w) -> (B, h*w, C): one token per latent position
            return self.proj_q(quantized.flatten(2).transpose(1, 2)), loss
        return self.proj_d(quantized.flatten(1)), loss  # q: (B, C*h*w)

    def hybrid_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """V_hy (B, n_visual, d) for the configured channel and fusion modes."""
        return self._visual(pixels)[0]

    def _visual(
        self, pixels: torch.Tensor, quantized: torch.Tensor | None = None, patches: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        pixels = pixels.to(self.voco.dtype)
        zero = pixels.new_zeros(())
        if cfg.channels == "continuous":
            return self.continuous_tokens(pixels, patches), zero
        v_d, vq_loss = self.discrete_tokens(pixels, quantized)
        if cfg.channels == "discrete":
            return v_d, vq_loss
        v = self.continuous_tokens(pixels, patches)
        if cfg.fusion == "pre":
            return torch.cat([v_d, v], dim=1), vq_loss  # Eq. 5: anchors first
        if cfg.fusion == "post":
            return torch.cat([v, v_d], dim=1), vq_loss
        return v + v_d.mean(dim=1, keepdim=True), vq_loss  # mean: anchors averaged into every patch

    # ---- the LLM over [S; V_hy; sep; voco; W] ----

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def _embed_fixed(self, ids: tuple[int, ...], batch: int) -> torch.Tensor:
        """A layout's fixed token ids embedded for every row: (B, len(ids), d)."""
        embeds = self.embed_text(torch.tensor(ids, dtype=torch.long, device=self.device))
        return embeds[None].expand(batch, -1, -1)

    def image_embeds(
        self, pixels: torch.Tensor, quantized: torch.Tensor | None = None, patches: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[V_hy; sep; voco] (B, n_visual + n_separator + n_voco, d): the per-image part of the sequence,
        and the VQ loss."""
        v_hy, vq_loss = self._visual(pixels, quantized, patches)
        batch = v_hy.shape[0]
        voco = self.voco[None].expand(batch, -1, -1)
        return torch.cat([v_hy, self._embed_fixed(self.layout.separator_ids, batch), voco], dim=1), vq_loss

    def prefix_embeds(
        self, pixels: torch.Tensor, quantized: torch.Tensor | None = None, patches: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the text, [S; V_hy; sep; voco] (B, text_position, d), and the VQ loss."""
        image, vq_loss = self.image_embeds(pixels, quantized, patches)
        shared = self._embed_fixed(self.layout.shared_ids, image.shape[0])
        return torch.cat([shared, image], dim=1), vq_loss

    def shared_prefix(self) -> KVState:
        """The key/value state of the shared prefix S (the layout's text before the image) in every layer,
        (1, kv_heads, n_shared, head_dim) each; empty tensors for a layout without one.

        S is causal over itself alone, so its state is the same for every image: one pass over S computes
        it once per model, and again only after a weight changed (`weights_version()`). compress() and
        decode() both take it from here, so the encoder and the decoder processes use the same values,
        a deterministic function of the weights and the tokenizer.
        """
        version = self.weights_version()
        if self._shared_state is None or self._shared_state[0] != version:
            self._shared_state = (version, self._compute_shared_prefix())
        return self._shared_state[1]

    @torch.inference_mode()
    def _compute_shared_prefix(self) -> KVState:
        cache = DynamicCache()
        ids = torch.tensor([self.layout.shared_ids], dtype=torch.long, device=self.device)  # (1, n_shared)
        if ids.shape[1]:
            # no mask given: plain causal attention, exactly M_hy's rows for S
            self.llm.model(
                input_ids=ids,
                position_ids=torch.arange(ids.shape[1], device=self.device)[None],
                cache=cache,
                use_cache=True,
            )
            return tuple((layer.keys, layer.values) for layer in cache.layers)
        cfg = self.llm.config
        empty = torch.empty(
            1, cfg.num_key_value_heads, 0, self.llm_head_dim, device=self.device, dtype=self.dtype
        )
        return tuple((empty, empty) for _ in range(cfg.num_hidden_layers))

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        text_lengths: Sequence[int] | torch.Tensor | None = None,
        text_attends_visual: bool = False,
        quantized: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full masked forward over X = [S; V_hy; sep; voco; W] (Algorithm 1), all computed here.

        input_ids (B, T) are right-padded to T; text_lengths gives each row's true length, or (B, K) the
        lengths of K question segments packed in the row (training several questions per compressed
        image: each segment sees the prefix and itself, at the positions one question alone would have).
        Returns the logits of the text positions (B, T, vocab), row t predicting token t + 1, and the VQ
        loss. `text_attends_visual=True` is the uncompressed upper bound (no bottleneck); `quantized` and
        `patches` are a precomputed MGVQ output and vision-tower output (see discrete_tokens and
        continuous_tokens).
        """
        batch, n_text = input_ids.shape
        if text_lengths is None:
            text_lengths = [n_text] * batch
        prefix, vq_loss = self.prefix_embeds(pixels, quantized, patches)
        embeds = torch.cat([prefix, self.embed_text(input_ids)], dim=1)
        lengths = torch.as_tensor(text_lengths, device=embeds.device)
        mask = self.layout.mask(lengths, text_attends_visual, dtype=embeds.dtype, device=embeds.device)
        _, offset = text_segments(lengths)  # (B, T): each segment starts where one question alone would
        prefix_positions = torch.arange(prefix.shape[1], device=embeds.device)[None].expand(batch, -1)
        positions = torch.cat([prefix_positions, prefix.shape[1] + offset], dim=1)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.logits[:, prefix.shape[1] :], vq_loss

    # ---- compress(): once per image ----

    @torch.inference_mode()
    def compress(
        self,
        images: Sequence[bytes],
        source_uris: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> list[Record]:
        """Image file bytes -> one `Record` each. A bad image raises `InvalidImageError` before any work."""
        if not images:
            return []
        size, processing = self.config.image_size, self.config.preprocess
        pixels = torch.stack([pixels_from_bytes(b, size, max_pixels, processing) for b in images])
        ids = [image_id_of(b) for b in images]
        return self.compress_pixels(pixels, ids, source_uris)

    @torch.inference_mode()
    def compress_pixels(
        self, pixels: torch.Tensor, image_ids: Sequence[str], source_uris: Sequence[str] | None = None
    ) -> list[Record]:
        """(B, 3, S, S) pixels in [0, 1] -> records: the voco tokens' latent and per-layer K/V state.

        [V_hy; sep; voco] run after the shared prefix's cached state, at the full pass's positions."""
        layout = self.layout
        device = self.voco.device
        image, _ = self.image_embeds(pixels.to(device))
        batch, length = image.shape[0], layout.text_position
        # the rows of [V_hy; sep; voco] in M_hy: (B, 1, L, L) -> (B, 1, L - n_shared, L)
        mask = layout.mask([0] * batch, dtype=image.dtype, device=device)[:, :, layout.n_shared :]
        positions = torch.arange(layout.n_shared, length, device=device)[None].expand(batch, -1)
        cache = DynamicCache()
        if layout.n_shared:
            # (1, kv_heads, n_shared, head_dim) -> (B, ...): DynamicCache copies it, the shared state stays
            shared = self.shared_prefix()
            cache = DynamicCache(
                [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in shared]
            )
        out = self.llm.model(
            inputs_embeds=image,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        keys, values = voco_state(cache, layout)
        # the hidden states cover [V_hy; sep; voco] only: the voco tokens are their last n_voco rows
        latents = out.last_hidden_state[:, -layout.n_voco :].mean(dim=1)  # (B, d)
        fingerprint = self.fingerprint()
        now = time.time()
        uris = list(source_uris) if source_uris is not None else [""] * batch
        return [
            Record(
                image_id=image_ids[i],
                fingerprint=fingerprint,
                latent=latents[i].float().cpu().clone(),
                keys=keys[i].cpu().clone(),
                values=values[i].cpu().clone(),
                voco_position=layout.voco_position,
                source_uri=uris[i],
                created_at=now,
            )
            for i in range(batch)
        ]

    # ---- identity ----

    def fingerprint(self) -> str:
        """SHA-256 over the config and every weight: two model versions never share cached records.

        Remembered with `weights_version()`, so any change to a weight (an optimizer step, load_state_dict,
        an in-place edit, a replaced parameter) makes the next call hash again; nobody invalidates it by
        hand. `load_pretrained` seeds it with the value saved beside the weights when they are unchanged.
        """
        version = self.weights_version()
        if self._fingerprint is None or self._fingerprint[0] != version:
            self._fingerprint = (version, self.hash_weights())
        return self._fingerprint[1]

    def weights_version(self) -> tuple[tuple[int, int], ...]:
        """Where every weight lives and how often it was modified in place: cheap, and different after
        any change to any weight."""
        tensors = [*self.parameters(), *self.buffers()]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def hash_weights(self) -> str:
        """The fingerprint computed from scratch: the config, then every state_dict tensor by name."""
        h = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            if tensor.is_meta:
                h.update(f"meta{tuple(tensor.shape)}{tensor.dtype}".encode())
                continue
            # hashlib reads the array's buffer: no bytes copy of each tensor (7B: 14 GB not copied twice)
            h.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
        return h.hexdigest()

    def remember_fingerprint(self, fingerprint: str) -> None:
        """Take a fingerprint known to be that of the current weights (a checkpoint's, verified)."""
        self._fingerprint = (self.weights_version(), fingerprint)

    def prompt_ids(self, question: str, turn: int = 0) -> list[int]:
        """The token ids of a question as the model sees it after the voco token: the layout's prompt
        template around it (today's tiny model: "Question: … Answer:"); for turn > 0 of a conversation,
        the template of a later turn, read right after the answer before it."""
        return self.tokenizer(self.layout.prompt_text(question, turn), add_special_tokens=False).input_ids

    @property
    def stop_ids(self) -> frozenset[int]:
        """The tokens that end an answer: EOS and the layout's stop tokens."""
        return self.layout.stop_ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (special tokens included): a text of n characters
        is at least n / max_token_chars tokens, which bounds a question's length before tokenizing it."""
        return max(len(token) for token in self.tokenizer.get_vocab())

    def turn_ids(self, question: str, answer: str, turn: int = 0) -> tuple[list[int], list[int]]:
        """A training turn: the question's `prompt_ids` and the target, the answer's tokens then EOS.

        The answer is tokenized as the reference trainers tokenize it (LLaVA's `preprocess_v1`): in one
        text with its prompt, "… ASSISTANT: answer", and cut where the prompt's own ids end. Alone,
        " answer" would start with a token of its own for the space under a tokenizer that adds a dummy
        prefix (LLaMA's legacy sentencepiece: "▁" "▁A" where the joined text has "▁A"), a token the model
        would learn to say first. Where the joined text's ids do not begin with the prompt's (a merge
        across the boundary), the answer is " answer" alone."""
        prompt = self.prompt_ids(question, turn)
        text = f"{self.layout.prompt_text(question, turn)} {answer.strip()}"
        joined = self.tokenizer(text, add_special_tokens=False).input_ids
        if joined[: len(prompt)] == prompt:
            ids = joined[len(prompt) :]
        else:
            ids = self.tokenizer(f" {answer.strip()}", add_special_tokens=False).input_ids
        return prompt, [*ids, self.tokenizer.eos_token_id]

    @property
    def llm_head_dim(self) -> int:
        cfg = self.llm.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def device(self) -> torch.device:
        return self.voco.device

    @property
    def dtype(self) -> torch.dtype:
        return self.voco.dtype
