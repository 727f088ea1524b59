"""Plain statistics the hot path fills; adapters (status topic, Prometheus) read them.

Nothing here does I/O or knows about Prometheus: the serving loop adds numbers,
and readers turn them into whatever they publish.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import accumulate

from streamproc.engine.prefix_cache import PrefixStats
from streamproc.metrics.percentiles import percentile

__all__ = ["percentile"]  # still importable from here
from streamproc.engine.sequence import Outcome

RATE_WINDOW_S = 30.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


@dataclass
class Histogram:
    """Bucketed observations; the Prometheus adapter reads ``cumulative()``."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        bounds = [*(str(b) for b in self.buckets), "+Inf"]
        return list(zip(bounds, accumulate(self.counts), strict=True))


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


def _latency() -> Histogram:
    return Histogram(LATENCY_BUCKETS)


@dataclass
class WorkerStats:
    """Every latency is in seconds; those ending a request run from the producer's submit."""

    rate: RateMeter = field(default_factory=RateMeter)
    tokens_generated: int = 0
    chunks_published: int = 0
    duplicates: int = 0
    """Jobs read again under a request id already read at another offset: not served."""
    prefix: PrefixStats = field(default_factory=PrefixStats)
    """The engine's prefix cache, as of the last step."""
    oom_retries: int = 0
    """Running requests put back after an out-of-memory step, to run in a smaller batch."""
    takeovers: int = 0
    """Requests taken over from an attempt that had started them."""
    takeover_records_read: int = 0
    """Reply records read to learn where taken-over streams stood."""
    takeover_seconds: float = 0.0
    streams_opened: int = 0
    mark_wait_seconds: float = 0.0
    """Time first messages waited for their record's attempts mark (steady-state cost)."""
    chunk_tokens_published: int = 0
    """Tokens in those chunks: over ``chunks_published``, how much coalescing merged."""
    outcomes: Counter[str] = field(default_factory=Counter)
    ttft: Histogram = field(default_factory=_latency)
    e2e: Histogram = field(default_factory=_latency)
    kafka_wait: Histogram = field(default_factory=_latency)
    engine_queue: Histogram = field(default_factory=_latency)
    inter_token: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    prefill: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    decode_step: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    batch_sequences: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    window_changes: Counter[str] = field(default_factory=Counter)
    """Adaptive-window decisions by reason."""
    _completion_tokens: deque[int] = field(default_factory=lambda: deque(maxlen=500))

    def step(self, tokens: int, busy_s: float) -> None:
        self.tokens_generated += tokens
        self.rate.record(tokens, busy_s)

    def finished(self, outcome: Outcome) -> None:
        """A request ended with a final message."""
        self.outcomes[outcome.finish_reason] += 1
        if outcome.finish_reason in ("stop", "length"):
            self._completion_tokens.append(outcome.usage.completion_tokens)
            self.ttft.observe(outcome.timings.ttft_s)
            self.e2e.observe(outcome.timings.total_s)

    def failed(self, code: str) -> None:
        """A request ended with an error message (``code`` is the wire error code)."""
        self.outcomes[code] += 1

    @property
    def avg_tokens_per_request(self) -> float:
        recent = self._completion_tokens
        return sum(recent) / len(recent) if recent else 0.0
