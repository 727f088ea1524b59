"""Turning per-request observations into the report's figures. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamproc.metrics.stats import percentile


@dataclass
class Observation:
    """One request as the client saw it (seconds on the client's clock)."""

    phase: str
    submitted: float
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    """Between successive tokens: a chunk of k tokens after a gap g counts k gaps of g/k."""


def summarize(observations: list[Observation], ttft_target_s: float,
              itl_target_s: float) -> dict[str, Any]:
    done = [o for o in observations if o.finished is not None]
    ttft = [o.first_token - o.submitted for o in done if o.first_token is not None]
    itl = [g for o in done for g in o.gaps]
    e2e = [o.finished - o.submitted for o in done if o.finished is not None]
    tokens = sum(o.tokens for o in done)
    span = (max(o.finished for o in done if o.finished) - min(o.submitted for o in done)
            if done else 0.0)
    within = [o for o in done if o.first_token is not None
              and o.first_token - o.submitted <= ttft_target_s
              and percentile(o.gaps, 95) <= itl_target_s]
    ms = 1000.0
    return {
        "requests": len(observations), "completed": len(done),
        "lost": len(observations) - len(done),
        "tokens": tokens, "tokens_per_s": tokens / span if span else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * ms, "ttft_p95_ms": percentile(ttft, 95) * ms,
        "ttft_p99_ms": percentile(ttft, 99) * ms,
        "itl_p50_ms": percentile(itl, 50) * ms, "itl_p95_ms": percentile(itl, 95) * ms,
        "itl_p99_ms": percentile(itl, 99) * ms,
        "e2e_p99_ms": percentile(e2e, 99) * ms,
        "within_targets": len(within) / len(done) if done else 0.0,
        # Goodput: tokens/s of the requests that met both their targets.
        "goodput_tokens_per_s": sum(o.tokens for o in within) / span if span else 0.0,
    }
