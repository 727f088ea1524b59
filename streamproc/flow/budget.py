"""How much a worker holds, and whether to pause fetching.

Pure: counts in, a decision out. A record counts against the request cap from
the moment it is read until everything it caused is acknowledged; its tokens
(prompt + ``max_new_tokens``) count against the token cap for as long.
Hysteresis: pause at the cap, resume only below ``low_water`` of it, so the
consumer does not flap between paused and fetching on every record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aiokafka.structs import TopicPartition

Gate = Literal["pause", "resume", "hold"]
Key = tuple[TopicPartition, int]


@dataclass
class InflightBudget:
    max_requests: int
    max_tokens: int
    low_water: float = 0.75
    _held: dict[Key, tuple[int, int]] = field(default_factory=dict)
    _held_tokens: int = 0
    _held_work: int = 0

    @property
    def requests(self) -> int:
        return len(self._held)

    @property
    def tokens(self) -> int:
        """Prompt + max new tokens held: what the KV cache may have to hold."""
        return self._held_tokens

    @property
    def work(self) -> int:
        """Tokens still to be generated for what is held, at most."""
        return self._held_work

    def room(self) -> int:
        """How many more records may be read now (at least 1, so polling continues)."""
        return max(1, self.max_requests - self.requests)

    def acquire(self, key: Key, tokens: int = 0, work: int = 0) -> None:
        self.release(key)
        self._held[key] = (tokens, work)
        self._held_tokens += tokens
        self._held_work += work

    def release(self, key: Key) -> None:
        tokens, work = self._held.pop(key, (0, 0))
        self._held_tokens -= tokens
        self._held_work -= work

    def release_partitions(self, partitions: set[TopicPartition]) -> None:
        for key in [k for k in self._held if k[0] in partitions]:
            self.release(key)

    def gate(self, paused: bool) -> Gate:
        full = self.requests >= self.max_requests or self._held_tokens >= self.max_tokens
        if not paused:
            return "pause" if full else "hold"
        low = (self.requests <= self.max_requests * self.low_water
               and self._held_tokens <= self.max_tokens * self.low_water)
        return "resume" if low else "hold"
