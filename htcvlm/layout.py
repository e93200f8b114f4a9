"""A config's sequence layout resolved against the model's tokenizer: the token ids and every position.

    [BOS · before_image] · V_hy · separator · voco · prompt(question) · answer [· next_prompt(q2) · answer2 …]
     0 .. n_shared-1       ...                 voco_position            text_position ..

The shared prefix [BOS · before_image] is the same for every image: its key/value state belongs to the
model, not to a record. V_hy and the separator are per image and never read by text, so they are dropped
after compress(); the voco tokens' state is the record. Text reads the shared prefix (unless the layout
says it does not: VoCo-LLaMA's text sees keys from the first voco on), the voco tokens and itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from htcvlm.config import HTCConfig, VisualAttention
from htcvlm.mask import hybrid_mask


@dataclass(frozen=True)
class SequenceLayout:
    shared_ids: tuple[int, ...]  # [BOS] + before_image: the text before V_hy, the same for every image
    separator_ids: tuple[int, ...]  # between V_hy and the voco tokens
    n_visual: int  # len(V_hy)
    n_voco: int
    visual_attention: VisualAttention
    text_attends_prefix: bool  # whether text reads the shared prefix (else only keys from voco on)
    prompt: str  # the text after the voco tokens, `{system}` filled in, `{question}` still to fill
    next_prompt: str  # a conversation's later turn after the answer before it, likewise
    stop_ids: frozenset[int]  # EOS and the configured stop tokens: each ends an answer
    # image i's marker (0-based i) in a question about several images; () for none
    marker_ids: Callable[[int], tuple[int, ...]] = field(default=lambda i: (), compare=False)

    @property
    def n_shared(self) -> int:
        return len(self.shared_ids)

    @property
    def n_separator(self) -> int:
        return len(self.separator_ids)

    @property
    def voco_position(self) -> int:
        """The position of the first voco token in the full sequence (what a record carries)."""
        return self.n_shared + self.n_visual + self.n_separator

    @property
    def text_position(self) -> int:
        """The position of the first prompt token: rotary phases of decoding start here."""
        return self.voco_position + self.n_voco

    @property
    def n_shared_read(self) -> int:
        """Shared prefix tokens that text attends: all of them or none."""
        return self.n_shared if self.text_attends_prefix else 0

    def prompt_text(self, question: str, turn: int = 0) -> str:
        """The text around a question: `prompt` for the first turn of a conversation (the only one the
        service asks), `next_prompt` for turn 1 and later, each right after the answer before it."""
        template = self.next_prompt if turn else self.prompt
        return template.replace("{question}", question.strip())

    def mask(
        self,
        text_lengths: list[int] | torch.Tensor,
        text_attends_visual: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """M_hy over the whole sequence, (B, 1, L, L) additive (see `hybrid_mask`)."""
        return hybrid_mask(
            self.n_visual,
            self.n_voco,
            text_lengths,
            self.visual_attention,
            text_attends_visual,
            dtype,
            device,
            n_shared=self.n_shared,
            n_separator=self.n_separator,
            text_attends_prefix=self.text_attends_prefix,
        )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False).input_ids) if text else ()


def resolve_layout(config: HTCConfig, tokenizer: PreTrainedTokenizerBase) -> SequenceLayout:
    """The layout of `config` tokenized by `tokenizer`; a BOS or stop token it lacks is a ValueError."""
    lc = config.layout
    bos: tuple[int, ...] = ()
    if lc.bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("the layout starts with BOS but the tokenizer has no bos_token")
        bos = (tokenizer.bos_token_id,)
    vocab = tokenizer.get_vocab()
    missing = [t for t in lc.stop_tokens if t not in vocab]
    if missing:
        raise ValueError(f"stop tokens {missing} are not tokens of the tokenizer's vocabulary")
    return SequenceLayout(
        shared_ids=bos + _ids(tokenizer, lc.with_system(lc.before_image)),
        separator_ids=_ids(tokenizer, lc.separator),
        n_visual=config.n_visual,
        n_voco=config.n_voco,
        visual_attention=config.visual_attention,
        text_attends_prefix=lc.text_attends_prefix,
        prompt=lc.with_system(lc.prompt),
        next_prompt=lc.with_system(lc.next_prompt or lc.prompt),
        stop_ids=frozenset(
            i for i in (tokenizer.eos_token_id, *(vocab[t] for t in lc.stop_tokens)) if i is not None
        ),
        marker_ids=_marker_ids(tokenizer, lc.image_marker),
    )


def _marker_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> Callable[[int], tuple[int, ...]]:
    """Image i's marker, tokenized once per i (a question may name thousands of images)."""

    @functools.cache
    def marker(i: int) -> tuple[int, ...]:
        return _ids(tokenizer, template.replace("{i}", str(i + 1))) if template else ()

    return marker
