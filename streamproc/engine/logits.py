"""What a step does to its logits besides choosing: penalties before, log-probabilities
beside.

Penalties (OpenAI's frequency and presence penalties, ``transformers``' repetition
penalty) change the logits a row's token is chosen from, greedy rows included; they read
a per-request count of the tokens generated so far, kept on the logits' device and updated
once per token. Log-probabilities are ``log_softmax`` of the model's own logits, taken
before any penalty or temperature: what the model said, not what the sampler did with it.
Both touch only the rows that ask for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamproc.wire import GenerationParams, TokenLogprob, TopLogprob


@dataclass
class PenaltyState:
    """One request's penalties and the counts they read."""

    frequency: float
    presence: float
    repetition: float
    counts: torch.Tensor
    """How many times each token was generated (the whole completion, across attempts)."""
    seen: torch.Tensor
    """Tokens of the prompt or the completion: what the repetition penalty applies to."""

    @classmethod
    def start(cls, params: GenerationParams, prompt_ids: list[int], completion: list[int],
              vocab: int, device: torch.device) -> PenaltyState | None:
        """None when the request asks for no penalty. ``prompt_ids`` are the prompt's own;
        ``completion`` what was generated before (a resumed or continued request)."""
        if (params.frequency_penalty == 0 and params.presence_penalty == 0
                and params.repetition_penalty == 1):
            return None
        counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if completion:
            counts += torch.bincount(torch.tensor(completion, device=device),
                                     minlength=vocab)[:vocab].float()
        seen = counts > 0
        if prompt_ids:
            seen[torch.tensor(prompt_ids, device=device).clamp(max=vocab - 1)] = True
        return cls(params.frequency_penalty, params.presence_penalty,
                   params.repetition_penalty, counts, seen)

    def generated(self, token: int) -> None:
        if token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True

    def apply(self, row: torch.Tensor) -> None:
        """Penalize one row of logits in place."""
        if self.repetition != 1:
            penalized = torch.where(row > 0, row / self.repetition, row * self.repetition)
            row.copy_(torch.where(self.seen, penalized, row))
        if self.frequency or self.presence:
            row -= self.counts * self.frequency + (self.counts > 0).float() * self.presence


def apply_penalties(logits: torch.Tensor, states: Sequence[PenaltyState | None]) -> None:
    """Each row's penalties, in place (rows without any untouched)."""
    for row, state in enumerate(states):
        if state is not None:
            state.apply(logits[row, :state.counts.shape[0]])


@dataclass(frozen=True)
class LogprobRequest:
    """A row that wants its token's log-probability, and ``top`` likeliest alternatives."""

    row: int
    top: int


class Logprobs:
    """The model's log-probabilities of the rows that ask, taken from the raw logits."""

    def __init__(self, logits: torch.Tensor, wanted: list[LogprobRequest]) -> None:
        self._wanted = wanted
        rows = [w.row for w in wanted]
        self._table = torch.log_softmax(logits[rows].float(), dim=-1) if rows else None

    def of(self, chosen: list[int], tokenizer: Any) -> dict[int, TokenLogprob]:
        """Row -> its chosen token's log-probability and top alternatives."""
        if self._table is None:
            return {}
        table = self._table
        picked = torch.tensor([chosen[w.row] for w in self._wanted], device=table.device)
        own = table.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
        widest = max(w.top for w in self._wanted)
        top_values, top_ids = (table.topk(widest, dim=-1) if widest else (None, None))
        out = {}
        for i, want in enumerate(self._wanted):
            alternatives: list[TopLogprob] = []
            if want.top and top_values is not None and top_ids is not None:
                ids = top_ids[i, :want.top].tolist()
                values = top_values[i, :want.top].tolist()
                alternatives = [TopLogprob(t, _text(tokenizer, t), v)
                                for t, v in zip(ids, values, strict=True)]
            token = chosen[want.row]
            out[want.row] = TokenLogprob(_text(tokenizer, token), own[i], alternatives)
        return out


def _text(tokenizer: Any, token: int) -> str:
    text: str = tokenizer.decode([token])
    return text
