"""How many waiting requests to admit into the running batch, and when.

Pure: numbers and a clock in, a decision out, so it is tested without Kafka or
a model. This is the fixed-window policy: while the engine is busy, newcomers
join at the next step; while it is idle, arrivals are gathered for up to
``window_s`` (or until a full batch is waiting) so their prefill is batched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchDecision:
    admit: int
    """How many requests to take from the head of the queue now."""
    wait_s: float | None
    """When ``admit`` is 0: how long to wait for more (None: until something arrives)."""


@dataclass(frozen=True)
class FixedWindowPolicy:
    max_batch_size: int
    max_batch_tokens: int
    window_s: float

    def decide(self, waiting_prompt_tokens: list[int], oldest_wait_s: float,
               running: int) -> BatchDecision:
        free = self.max_batch_size - running
        if free <= 0 or not waiting_prompt_tokens:
            return BatchDecision(0, None)
        fits = self._fits(waiting_prompt_tokens, free)
        batch_full = fits < len(waiting_prompt_tokens) or fits == free
        if running > 0 or batch_full or oldest_wait_s >= self.window_s:
            return BatchDecision(fits, None)
        return BatchDecision(0, self.window_s - oldest_wait_s)

    def _fits(self, prompt_tokens: list[int], free: int) -> int:
        """Requests from the head that fit the slot and token budgets (at least one)."""
        total = 0
        for count, tokens in enumerate(prompt_tokens[:free]):
            total += tokens
            if total > self.max_batch_tokens:
                return max(count, 1)
        return min(free, len(prompt_tokens))
