"""A simulated engine with a step-cost model, to close the loop around a batching policy
without a model or a broker.

Each step decodes one token for every running row, then prefills what the policy
admitted; the step takes ``decode(B) + prefill(T)`` seconds (with a little noise), as a
compute-bound device does. The costs default to what SmolLM2-135M measured on one core
of the development machine: decode ≈ 55 + 4.8·B ms, prefill ≈ 65 + 2.8·T ms a pass.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from streamproc.admission.adaptive import AdaptiveController
from streamproc.admission.policy import BatchPolicy
from streamproc.metrics.stats import percentile


@dataclass(frozen=True)
class Costs:
    decode_fixed_s: float = 0.055
    decode_per_row_s: float = 0.0048
    prefill_fixed_s: float = 0.065
    prefill_per_token_s: float = 0.0028
    noise: float = 0.05
    decode_at: tuple[tuple[int, float], ...] = ()
    """Row counts whose decode departs from the line, and what it takes there."""

    def step_s(self, rows: int, prefill_tokens: int, rng: random.Random) -> tuple[float, float]:
        decode = self.decode_fixed_s + self.decode_per_row_s * rows if rows else 0.0
        decode = dict(self.decode_at).get(rows, decode)
        prefill = (self.prefill_fixed_s + self.prefill_per_token_s * prefill_tokens
                   if prefill_tokens else 0.0)
        return (decode * rng.uniform(1 - self.noise, 1 + self.noise),
                prefill * rng.uniform(1 - self.noise, 1 + self.noise))


WORKER = Costs(decode_fixed_s=0.060, decode_at=((2, 0.097), (3, 0.120)))
"""As SmolLM2's steps measured inside a bench worker: two and three rows cost more than
four (97 and 120 ms against 92), a shape no line through the small sizes foresees."""


@dataclass(frozen=True)
class Arrival:
    at: float
    prompt_tokens: int
    new_tokens: int


@dataclass
class _Row:
    arrival: Arrival
    left: int
    last_token_at: float


@dataclass
class Outcome:
    gaps_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    completed: int = 0
    finished_at: float = 0.0
    rows_per_step: list[int] = field(default_factory=list)

    @property
    def itl_p95_s(self) -> float:
        return percentile(self.gaps_s, 95)

    @property
    def tokens_per_s(self) -> float:
        tokens = len(self.gaps_s) + len(self.ttfts_s)
        return tokens / self.finished_at if self.finished_at else 0.0


def simulate(policy: BatchPolicy, controller: AdaptiveController | None,
             arrivals: list[Arrival], costs: Costs = Costs(), *, seed: int = 0,
             max_time_s: float = 3600.0) -> Outcome:
    """Serve ``arrivals`` (sorted by time) to the end; what the readers saw."""
    rng = random.Random(seed)
    pending = deque(arrivals)
    waiting: deque[Arrival] = deque()
    running: list[_Row] = []
    out = Outcome()
    now = 0.0
    while (pending or waiting or running) and now < max_time_s:
        while pending and pending[0].at <= now:
            waiting.append(pending.popleft())
        oldest = now - waiting[0].at if waiting else 0.0
        decision = policy.decide([a.prompt_tokens for a in waiting], oldest, len(running))
        admitted = [waiting.popleft() for _ in range(min(decision.admit, len(waiting)))]
        if not running and not admitted:
            now = _idle_until(now, decision.wait_s, pending)
            continue
        now = _step(now, running, admitted, controller, costs, rng, out, len(waiting))
    out.finished_at = now
    return out


def _idle_until(now: float, wait_s: float | None, pending: deque[Arrival]) -> float:
    candidates = [now + wait_s] if wait_s is not None else []
    if pending:
        candidates.append(pending[0].at)
    return max(now + 1e-4, min(candidates, default=now + 1e-4))


def _step(now: float, running: list[_Row], admitted: list[Arrival],
          controller: AdaptiveController | None, costs: Costs, rng: random.Random,
          out: Outcome, backlog: int) -> float:
    rows = len(running)
    prefill_tokens = sum(a.prompt_tokens for a in admitted)
    decode_s, prefill_s = costs.step_s(rows, prefill_tokens, rng)
    now += decode_s + prefill_s
    gaps = []
    for row in running:
        gaps.append(now - row.last_token_at)
        row.last_token_at, row.left = now, row.left - 1
    ttfts = [now - a.at for a in admitted]
    newcomers = [_Row(a, a.new_tokens - 1, now) for a in admitted]
    out.completed += sum(1 for r in running + newcomers if r.left <= 0)
    running[:] = [r for r in running + newcomers if r.left > 0]
    out.gaps_s += gaps
    out.ttfts_s += ttfts
    out.rows_per_step.append(rows)
    if controller is not None:
        controller.observe_step(now, gaps, ttfts, decode_rows=rows, decode_s=decode_s,
                                prefill_tokens=prefill_tokens, prefill_s=prefill_s)
        controller.adjust(now, backlog)
    return now


def burst_then_wave(seed: int = 0, *, base_rate: float = 0.5, burst_factor: float = 10,
                    wave: int = 64) -> list[Arrival]:
    """A steady phase, a 10x burst, a quiet phase, then a wave all at once."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []

    def poisson(start: float, end: float, rate: float) -> None:
        t = start + rng.expovariate(rate)
        while t < end:
            arrivals.append(Arrival(t, rng.randint(25, 60), rng.randint(16, 48)))
            t += rng.expovariate(rate)

    poisson(0.0, 20.0, base_rate)
    poisson(20.0, 30.0, base_rate * burst_factor)
    poisson(30.0, 50.0, base_rate)
    arrivals += [Arrival(60.0, rng.randint(25, 60), rng.randint(16, 48)) for _ in range(wave)]
    return sorted(arrivals, key=lambda a: a.at)
