"""Plain statistics the hot path fills; adapters (status topic, Prometheus) read them.

Nothing here does I/O or knows about Prometheus: the serving loop adds numbers,
and readers turn them into whatever they publish.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 30.0


@dataclass
class RateMeter:
    """Generated tokens per second of busy engine time, over a sliding window.

    Busy time, not wall time: an idle engine still *can* generate as fast as it
    did, and that capacity is what a drain-time estimate needs.
    """

    window_s: float = RATE_WINDOW_S
    _steps: deque[tuple[float, int, float]] = field(default_factory=deque)
    _last_rate: float = 0.0

    def record(self, tokens: int, busy_s: float, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        self._steps.append((at, tokens, busy_s))
        while self._steps and at - self._steps[0][0] > self.window_s:
            self._steps.popleft()
        busy = sum(s[2] for s in self._steps)
        if busy > 0:
            self._last_rate = sum(s[1] for s in self._steps) / busy

    @property
    def tokens_per_s(self) -> float:
        return self._last_rate


@dataclass
class WorkerStats:
    rate: RateMeter = field(default_factory=RateMeter)
    tokens_generated: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    _completion_tokens: deque[int] = field(default_factory=lambda: deque(maxlen=500))

    def step(self, tokens: int, busy_s: float) -> None:
        self.tokens_generated += tokens
        self.rate.record(tokens, busy_s)

    def finished(self, outcome: str, completion_tokens: int) -> None:
        self.outcomes[outcome] += 1
        if outcome in ("stop", "length"):
            self._completion_tokens.append(completion_tokens)

    @property
    def avg_tokens_per_request(self) -> float:
        recent = self._completion_tokens
        return sum(recent) / len(recent) if recent else 0.0
