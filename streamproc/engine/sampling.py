"""Choosing each step's tokens from the batch's logits, all rows at once.

Greedy rows take the argmax. Sampled rows (temperature, top-k, top-p) are drawn
together by inverse transform: one uniform draw per row picks a token from the
row's cumulative distribution. Each draw is a pure function of the request's
seed and the token's position, not of a generator object stepped per row: the
whole batch samples in a few tensor operations with one host synchronization
(per-row generators cost a dozen small operations and a synchronization per
sampled row: on CPU, a decode step of 128 rows sampling with top-p took about
three times as long as a greedy one that way).

A request's tokens therefore depend only on its seed, its parameters and its
logits, not on which other requests shared its batch. A request without a
``seed`` gets one derived from its request id, so a run is reproducible, and a
request resumed after a takeover draws by its position in the whole completion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy
import torch

from streamproc.wire import GenerationParams

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_DRAW_BITS = 24
"""A float32 mantissa's worth: the cumulative sums the draws are compared with are float32."""
GREEDY_BELOW = 1e-5
"""Temperatures under this decode greedily: dividing logits by them overflows float32."""


@dataclass(frozen=True)
class Sampler:
    """How one request samples its tokens."""

    seed: int
    temperature: float
    top_p: float
    top_k: int = 0
    """0: no top-k truncation."""

    @property
    def truncates(self) -> bool:
        """Whether it draws among the likeliest tokens only (top-k or top-p)."""
        return self.top_p < 1.0 or self.top_k > 0


def sampler_for(params: GenerationParams, request_id: str) -> Sampler | None:
    """None for greedy decoding (temperature 0, or too small to divide by)."""
    if params.temperature < GREEDY_BELOW:
        return None
    seed = params.seed if params.seed is not None else default_seed(request_id)
    return Sampler(seed, params.temperature, params.top_p, params.top_k)


def default_seed(request_id: str) -> int:
    """Stable across processes and machines (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") >> 1


def uniform_draw(seed: int, position: int) -> float:
    """The draw in [0, 1) for the token at ``position`` of a request seeded ``seed``:
    output ``position`` of the SplitMix64 sequence that starts at ``seed``."""
    x = (seed + (position + 1) * _GOLDEN_GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> (64 - _DRAW_BITS)) / (1 << _DRAW_BITS)


def choose_tokens(logits: torch.Tensor, samplers: Sequence[Sampler | None],
                  positions: Sequence[int]) -> list[int]:
    """One token per row of ``logits``: row i samples with ``samplers[i]`` (greedy when
    None) at ``positions[i]``, the number of tokens its request generated before."""
    chosen = logits.argmax(dim=-1)
    # Rows with and without truncation are drawn apart: the first walk their tokens from the
    # most likely down, the others in vocabulary order, and a row must not draw a different
    # token because a neighbour asked for top-p.
    for nucleus in (False, True):
        group = [(row, s, positions[row]) for row, s in enumerate(samplers)
                 if s is not None and s.truncates == nucleus]
        if group:
            rows = [row for row, _, _ in group]
            chosen[rows] = _sample(logits[rows], [(s, position) for _, s, position in group],
                                   nucleus=nucleus)
    tokens: list[int] = chosen.tolist()
    return tokens


def _sample(logits: torch.Tensor, rows: list[tuple[Sampler, int]], *,
            nucleus: bool) -> torch.Tensor:
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    probs = torch.softmax(logits.float() / column([s.temperature for s, _ in rows]), dim=-1)
    order: torch.Tensor | None = None
    if nucleus:
        probs, order = _sorted_descending(probs)
        # Top-k first, then top-p over what it kept ("transformers"' order): each row keeps
        # its k likeliest tokens, then the smallest prefix of those whose mass reaches its
        # top_p (at least one token).
        ranks = torch.arange(probs.shape[-1], device=device).unsqueeze(0)
        k = column([float(s.top_k or probs.shape[-1]) for s, _ in rows])
        truncated = ranks >= k
        probs = probs.masked_fill(truncated, 0.0)
        # Rows without top-k compare with top_p itself (their mass is 1 up to rounding).
        kept = torch.where(truncated.any(dim=-1, keepdim=True),
                           probs.sum(dim=-1, keepdim=True), 1.0)
        outside = torch.cumsum(probs, dim=-1) - probs >= column([s.top_p for s, _ in rows]) * kept
        probs = probs.masked_fill(outside, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    targets = column([uniform_draw(s.seed, position) for s, position in rows]) * total
    index = torch.searchsorted(cdf, targets, right=True)
    # A target rounded up to the total would land past the last token with any mass.
    last_with_mass = (cdf < total).sum(dim=-1, keepdim=True)
    index = torch.minimum(index, last_with_mass)
    picked = index if order is None else order.gather(1, index)
    return picked.squeeze(1)


def _sorted_descending(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row high to low, and where each value came from. On CPU through numpy: torch's
    CPU sort took 2.6 ms for 128 rows of 512 on one thread, numpy's 0.4 ms (probe)."""
    if probs.device.type != "cpu":
        return torch.sort(probs, dim=-1, descending=True)
    order = torch.from_numpy(numpy.argsort(-probs.numpy(), axis=-1))
    return probs.gather(1, order), order
