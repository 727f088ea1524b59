"""The arrival trace every peer replays: steady Poisson phases, a burst, a saturation wave.

Pure and seeded: the same settings give the same trace, so peers see identical load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = ["kafka", "stream", "token", "batch", "latency", "queue", "worker", "partition",
         "offset", "lag", "prompt", "model", "cache", "window", "throughput", "order"]


@dataclass(frozen=True)
class Arrival:
    at_s: float
    """Seconds after the start of the replay."""
    prompt: str
    max_new_tokens: int
    phase: str


@dataclass(frozen=True)
class TraceSettings:
    rates: tuple[float, ...] = (2.0, 5.0, 10.0)
    """Steady Poisson phases, requests per second."""
    phase_s: float = 10.0
    burst_factor: float = 10.0
    """The burst runs at this many times the middle rate..."""
    burst_s: float = 3.0
    """... for this long."""
    saturation_requests: int = 1000
    """Then this many at once, for saturated throughput."""
    gap_s: float = 2.0
    prompt_words: tuple[int, int] = (4, 48)
    max_new_tokens: int = 32
    seed: int = 7


def build(settings: TraceSettings) -> list[Arrival]:
    rng = random.Random(settings.seed)
    arrivals: list[Arrival] = []
    clock = 0.0
    for rate in settings.rates:
        arrivals += _poisson(rng, settings, clock, settings.phase_s, rate, f"steady_{rate:g}")
        clock += settings.phase_s + settings.gap_s
    burst_rate = settings.rates[len(settings.rates) // 2] * settings.burst_factor
    arrivals += _poisson(rng, settings, clock, settings.burst_s, burst_rate, "burst")
    clock += settings.burst_s + settings.phase_s
    arrivals += [_arrival(rng, settings, clock, "saturation")
                 for _ in range(settings.saturation_requests)]
    return arrivals


def _poisson(rng: random.Random, settings: TraceSettings, start: float, length: float,
             rate: float, phase: str) -> list[Arrival]:
    out, at = [], start + rng.expovariate(rate)
    while at < start + length:
        out.append(_arrival(rng, settings, at, phase))
        at += rng.expovariate(rate)
    return out


def _arrival(rng: random.Random, settings: TraceSettings, at: float, phase: str) -> Arrival:
    words = rng.randint(*settings.prompt_words)
    prompt = " ".join(rng.choice(WORDS) for _ in range(words))
    return Arrival(at, prompt, settings.max_new_tokens, phase)
