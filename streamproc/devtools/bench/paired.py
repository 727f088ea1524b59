"""Saturated throughput against the ceiling, measured side by side in time.

The trace's saturation wave and the sweep of ``generate()`` over batch sizes run a
minute or more apart, and the sweep keeps the best of its short samples (two
batches each: at batch size 8, about a tenth of a second of work). On a shared
machine whose speed moves within seconds, that one ratio says as much about when
each side was measured as about serving. So, while the streamproc
peer is still up after the trace, this takes turns: ``generate()`` at the sweep's
best batch size, a saturation wave through the worker, ``generate()`` again, and so
on. Each wave is compared with the mean of the two ceiling runs around it, and the
median over the rounds is the figure the target reads.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from streamproc.client import StreamprocClient
from streamproc.devtools.bench.load import replay
from streamproc.devtools.bench.measure import Observation, summarize
from streamproc.devtools.bench.offload import off_loop
from streamproc.devtools.bench.peers import offline_ceiling
from streamproc.devtools.bench.trace import Arrival
from streamproc.engine.loader import LoadedModel

Progress = Callable[[str], None]


def wave_ratios(ceilings: list[float], waves: list[float]) -> list[float]:
    """Each wave's rate over the mean of the ceiling runs just before and just after it."""
    if len(ceilings) != len(waves) + 1:
        raise ValueError(f"{len(waves)} waves need {len(waves) + 1} ceiling runs around "
                         f"them, got {len(ceilings)}")
    return [wave / ((before + after) / 2)
            for wave, before, after in zip(waves, ceilings, ceilings[1:], strict=False)]


def best_batch_size(sweep: dict[str, float]) -> int:
    return int(max(sweep, key=lambda size: sweep[size]))


@dataclass
class PairedCeiling:
    """The sweep and the paired rounds, run by :meth:`measure` against a live streamproc
    peer; what they found stays here for the report."""

    loaded: LoadedModel
    prompts: list[str]
    """What the ceiling generates from (cycled to fill its batches)."""
    wave: list[Arrival]
    """One saturation wave, submitted all at once each round."""
    new_tokens: int
    batch_sizes: tuple[int, ...]
    rounds: int
    drain_timeout_s: float
    sweep_batches: int = 2
    """Full batches per batch size in the sweep."""
    paired_batches: int = 4
    """Full batches of the best size per ceiling run: about as long as a wave takes."""
    sweep: dict[str, float] = field(default_factory=dict)
    ceilings: list[float] = field(default_factory=list)
    waves: list[list[Observation]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """The sweep's best batch size, at which the ceiling is measured between waves."""
        return best_batch_size(self.sweep)

    async def sweep_sizes(self, progress: Progress = lambda _: None) -> None:
        for size in self.batch_sizes:  # one at a time, to say how far it has got
            self.sweep.update(await off_loop(offline_ceiling, self.loaded, self.prompts,
                                             self.new_tokens, (size,),
                                             batches=self.sweep_batches))
            progress(f"offline ceiling: batch size {size}: "
                     f"{self.sweep[str(size)]:.1f} tokens/s")

    async def measure(self, client: StreamprocClient,
                      progress: Progress = lambda _: None) -> None:
        """The rounds, after :meth:`sweep_sizes`: ceiling, wave, ceiling, ..., ceiling."""
        wave = [replace(a, at_s=0.0) for a in self.wave]
        self.ceilings.append(await self._ceiling())
        for round_ in range(1, self.rounds + 1):
            self.waves.append(await replay(client, wave, self.drain_timeout_s))
            self.ceilings.append(await self._ceiling())
            progress(f"paired round {round_}/{self.rounds}: ceiling "
                     f"{self.ceilings[-2]:.1f} and {self.ceilings[-1]:.1f} tokens/s around "
                     f"a wave of {summarize(self.waves[-1], 1, 1)['tokens_per_s']:.1f}")

    async def _ceiling(self) -> float:
        rates = await off_loop(offline_ceiling, self.loaded, self.prompts,
                               self.new_tokens, (self.batch_size,),
                               batches=self.paired_batches)
        return rates[str(self.batch_size)]

    def report(self, ttft_target_s: float, itl_target_s: float) -> dict[str, Any]:
        """The rounds' figures: each wave's tokens/s as the trace's waves are summarized,
        the ceiling runs around them, the ratios and their median."""
        figures = [summarize(w, ttft_target_s, itl_target_s) for w in self.waves]
        rates = [f["tokens_per_s"] for f in figures]
        ratios = wave_ratios(self.ceilings, rates) if rates else []
        return {"batch_size": self.batch_size if self.sweep else None, "rounds": len(rates),
                "ceiling_tokens_per_s": self.ceilings, "streamproc_tokens_per_s": rates,
                "ratios": ratios, "median_ratio": statistics.median(ratios) if ratios else 0.0,
                "requests": sum(f["requests"] for f in figures),
                "completed": sum(f["completed"] for f in figures),
                "lost": sum(f["lost"] for f in figures)}
