"""Generation for a batch of rows: options, each row's progress and streamed text, batched sampling.

`sample_tokens` picks the next token of every row in one tensor pass on the model's device (greedy rows
by argmax, sampling rows by temperature + top-p through one uniform draw each from the row's own
generator), then reads the B tokens back in one transfer: one host sync per step, not one per row.
A row's draws depend only on its seed, never on which rows share its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# "eos": the model ended the answer with EOS or one of its layout's stop tokens; "length": max_new_tokens.
FinishReason = Literal["eos", "length"]


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 is greedy decoding
    top_p: float = 1.0  # nucleus sampling mass; 1 keeps the whole distribution
    seed: int | None = None  # sampling seed; None draws from torch's global generator

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in [1, 4096], got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StepEvent:
    """One decoding step for one row: the token and the text it completes (may be '' mid-character)."""

    row: int  # the row's id in its running batch (for decode(): its index in the request)
    token_id: int
    text: str
    finished: FinishReason | None = None
    prompt_tokens: int = 0  # the row's question length in tokens (for usage accounting)


@dataclass
class TextStream:
    """Incremental detokenization in constant work per token: only a window of recent tokens is decoded.

    Byte-level tokens can split a character, so text is held back until it decodes cleanly; tokenizers
    that join pieces (a leading space, a merged word) are handled by decoding the window from a token
    already emitted (`start`) and keeping what follows its text.
    """

    ids: list[int] = field(default_factory=list)
    start: int = 0  # the window's first token
    emitted: int = 0  # tokens whose text has been emitted

    def push(self, tokenizer: PreTrainedTokenizerBase, token_id: int | None, final: bool) -> str:
        """The new text after `token_id` (None: no token, as for EOS); `final` flushes what was held."""
        if token_id is not None:
            self.ids.append(token_id)
        done = tokenizer.decode(self.ids[self.start : self.emitted], skip_special_tokens=True)
        text = tokenizer.decode(self.ids[self.start :], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        self.start, self.emitted = self.emitted, len(self.ids)
        return text[len(done) :]


class RowState:
    """One row's generation: its options and random generator, how far it has got, its streamed text."""

    def __init__(
        self, options: GenerationOptions, prompt_tokens: int, stop_ids: Collection[int] = ()
    ) -> None:
        self.options = options
        self.prompt_tokens = prompt_tokens
        self.stop_ids = stop_ids  # tokens besides EOS that end the answer (the model's stop tokens)
        self.generated = 0
        # CPU generators: one uniform per step each, drawn on the host without waiting for the device
        self.generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        self._text = TextStream()

    def advance(self, row: int, token: int, tokenizer: PreTrainedTokenizerBase) -> StepEvent:
        """Record the row's sampled `token`; the event carries its text and says if the row finished.
        EOS or a stop token ends the row and adds no text."""
        self.generated += 1
        finished: FinishReason | None = None
        stops = token == tokenizer.eos_token_id or token in self.stop_ids
        if stops:
            finished = "eos"
        elif self.generated >= self.options.max_new_tokens:
            finished = "length"
        text = self._text.push(tokenizer, None if stops else token, final=finished is not None)
        return StepEvent(row, token, text, finished, self.prompt_tokens)

    def uniform(self) -> float:
        """This row's next draw in [0, 1) for inverse-CDF sampling."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


def sample_tokens(logits: torch.Tensor, rows: Sequence[RowState]) -> tuple[list[int], list[int]]:
    """The next token of every row from its (B, vocab) logits, and the rows whose logits are unusable.

    Greedy rows take the argmax. Sampling rows are shifted so their top logit is 0 and divided by their
    temperature in fp64, so every accepted temperature gives finite probabilities (a vanishing one
    collapses onto the top token: greedy, ties drawn at random); top-p keeps the smallest prefix of the
    sorted distribution whose mass reaches p (the first token always stays); the token is where the
    row's uniform draw falls in what is left. A row whose logits are not finite cannot be sampled: its
    index comes back in the second list (its token is meaningless) so the caller fails that row alone.
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    broken = ~torch.isfinite(logits.amax(dim=-1))  # (B,): all -inf, an inf, or a NaN (amax propagates it)
    sampling = [i for i, row in enumerate(rows) if row.options.temperature > 0]
    if sampling:
        device = logits.device
        index = torch.tensor(sampling, device=device)
        temperature = torch.tensor([rows[i].options.temperature for i in sampling], dtype=torch.float64)
        top_p = torch.tensor([rows[i].options.top_p for i in sampling], dtype=torch.float64)
        draws = torch.tensor([rows[i].uniform() for i in sampling], dtype=torch.float64)
        x = logits[index].double()  # (S, vocab)
        probs = torch.softmax((x - x.amax(dim=-1, keepdim=True)) / temperature.to(device)[:, None], dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)  # (S, vocab) each
        ordered[ordered.cumsum(dim=-1) - ordered >= top_p.to(device)[:, None]] = 0.0
        cdf = ordered.cumsum(dim=-1)
        target = (draws.to(device) * cdf[:, -1])[:, None]  # (S, 1): the draw scaled to the kept mass
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        tokens[index] = order.gather(-1, pick)[:, 0]
        broken[index] |= ~torch.isfinite(cdf[:, -1])
    picked, unusable = torch.stack([tokens, broken.long()]).tolist()  # one transfer for both
    return picked, [i for i, bad in enumerate(unusable) if bad]
