"""Keeping the running batch's keys and values within a memory budget.

Each request holds keys and values for its prompt and, as it generates, for its new
tokens: up to ``prompt + max_new_tokens`` positions, its span. The running batch is
right-aligned (every row as wide as the widest), so the memory it may come to need is
rows times the widest span; admission takes a waiting request only while that stays within the
budget (in tokens: the setting's bytes over what one token's keys and values take for this
model and dtype). A request whose span alone exceeds the budget is refused when it is read
(``prompt_too_long``): it could never run.
"""

from __future__ import annotations

from dataclasses import dataclass


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Keys and values of one token, over every layer."""
    return 2 * layers * kv_heads * head_dim * element_bytes


@dataclass(frozen=True)
class KvBudget:
    tokens: int = 0
    """Positions the running batch may hold in all; 0: no bound."""

    @classmethod
    def of(cls, budget_bytes: int, bytes_per_token: int) -> KvBudget:
        if budget_bytes <= 0 or bytes_per_token <= 0:
            return cls()
        return cls(max(1, budget_bytes // bytes_per_token))

    @property
    def bounded(self) -> bool:
        return self.tokens > 0

    def fits(self, spans: list[int]) -> bool:
        """Whether requests of these spans may run together (one alone always may)."""
        return not self.bounded or len(spans) <= 1 or len(spans) * max(spans) <= self.tokens


UNBOUNDED = KvBudget()
