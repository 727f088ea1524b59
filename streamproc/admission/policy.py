"""How many waiting requests to admit into the running batch, and when.

Pure: numbers and a clock in, a decision out, so they are tested without Kafka
or a model. The fixed-window policy: while the engine is busy, newcomers join
at the next step; while it is idle, arrivals are gathered for up to
``window_s`` (or until a full batch is waiting) so their prefill is batched.
The adaptive policy admits what an :class:`AdaptiveController` says fits the next
step's inter-token budget, and gathers only while the engine is idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from streamproc.admission.adaptive import AdaptiveController


@dataclass(frozen=True)
class BatchDecision:
    admit: int
    """How many requests to take from the head of the queue now."""
    wait_s: float | None
    """When ``admit`` is 0: how long to wait for more (None: until something arrives)."""


class BatchPolicy(Protocol):
    @property
    def window_s(self) -> float: ...

    @property
    def admit_size(self) -> int: ...

    @property
    def running_cap(self) -> int: ...

    def decide(self, waiting_prompt_tokens: list[int], oldest_wait_s: float,
               running: int, prefilling_tokens: int = 0) -> BatchDecision: ...


def fits_budget(prompt_tokens: list[int], limit: int, max_tokens: int) -> int:
    """Requests from the head that fit ``limit`` slots and the token budget (at least one)."""
    total = 0
    for count, tokens in enumerate(prompt_tokens[:limit]):
        total += tokens
        if total > max_tokens:
            return max(count, 1)
    return min(limit, len(prompt_tokens))


@dataclass(frozen=True)
class FixedWindowPolicy:
    max_batch_size: int
    max_batch_tokens: int
    window_s: float

    @property
    def admit_size(self) -> int:
        return self.max_batch_size

    @property
    def running_cap(self) -> int:
        return self.max_batch_size

    def decide(self, waiting_prompt_tokens: list[int], oldest_wait_s: float,
               running: int, prefilling_tokens: int = 0) -> BatchDecision:
        free = self.max_batch_size - running
        if free <= 0 or not waiting_prompt_tokens:
            return BatchDecision(0, None)
        fits = fits_budget(waiting_prompt_tokens, free, self.max_batch_tokens)
        batch_full = fits < len(waiting_prompt_tokens) or fits == free
        if running > 0 or batch_full or oldest_wait_s >= self.window_s:
            return BatchDecision(fits, None)
        return BatchDecision(0, self.window_s - oldest_wait_s)


@dataclass(frozen=True)
class AdaptivePolicy:
    """While the engine is busy, admit what the controller says fits the next step; while
    it is idle, gather arrivals for ``window_s`` (or until the cap's worth wait), then
    admit up to the cap. Prompt tokens stay within ``max_batch_tokens`` a step."""

    controller: AdaptiveController
    max_batch_size: int
    max_batch_tokens: int

    @property
    def window_s(self) -> float:
        return self.controller.window_s

    @property
    def admit_size(self) -> int:
        return self.controller.admitted

    @property
    def running_cap(self) -> int:
        return min(self.max_batch_size, self.controller.running_cap)

    def decide(self, waiting_prompt_tokens: list[int], oldest_wait_s: float,
               running: int, prefilling_tokens: int = 0) -> BatchDecision:
        if not waiting_prompt_tokens:
            return BatchDecision(0, None)
        free = self.running_cap - running
        if running == 0 and len(waiting_prompt_tokens) < free \
                and oldest_wait_s < self.window_s:
            return BatchDecision(0, self.window_s - oldest_wait_s)
        count = self.controller.admission(waiting_prompt_tokens[:max(free, 0)], running,
                                          prefilling_tokens)
        if count == 0:
            return BatchDecision(0, None)
        return BatchDecision(fits_budget(waiting_prompt_tokens, count, self.max_batch_tokens),
                             None)
