"""One engine step as the serving loop sees it, and what runs the engine for it.

The engine runs on a thread of the worker's (:mod:`streamproc.worker.engine_thread`)
or in a process of its own (:mod:`streamproc.worker.engine_process`); either way the
loop posts work and collects results through the same :class:`EngineRunner` calls,
implemented once in :mod:`streamproc.worker.runner`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from streamproc.engine.engine import Engine
from streamproc.engine.prefix_cache import PrefixStats
from streamproc.engine.sequence import PreparedRequest, TokenEvent


class StepFigures(msgspec.Struct, frozen=True, array_like=True):
    """One engine step's timings and sizes, captured as the step ends (the engine's own
    fields change with the next step)."""

    busy_s: float
    prefill_s: float
    decode_s: float
    kv_tokens: int
    ended: float
    ended_wall: float
    decode_rows: int
    prefill_tokens: int
    prefix: PrefixStats


@dataclass(frozen=True)
class StepResult:
    """One engine step's output, captured as the step ends (the engine's own fields change
    with the next step)."""

    events: list[TokenEvent]
    busy_s: float
    prefill_s: float
    decode_s: float
    kv_tokens: int
    ended: float
    """Monotonic seconds (one clock for every process on the machine)."""
    ended_wall: float
    decode_rows: int = 0
    """Rows the step decoded."""
    prefill_tokens: int = 0
    """Prompt tokens the step prefilled (computed: cached prefixes are not)."""
    prefix: PrefixStats = field(default_factory=PrefixStats)
    """The prefix cache's counts so far, as the step ended."""

    @classmethod
    def of(cls, figures: StepFigures, events: list[TokenEvent]) -> StepResult:
        return cls(events, *msgspec.structs.astuple(figures))

    @property
    def figures(self) -> StepFigures:
        return StepFigures(self.busy_s, self.prefill_s, self.decode_s, self.kv_tokens,
                           self.ended, self.ended_wall, self.decode_rows,
                           self.prefill_tokens, self.prefix)


def run_step(engine: Engine, admitted: list[PreparedRequest], abandon: frozenset[int],
             cancel: frozenset[int]) -> StepResult:
    """:meth:`Engine.step`, timed."""
    started = time.monotonic()
    events = engine.step(admitted, abandon, cancel)
    ended = time.monotonic()
    return StepResult(events, ended - started, engine.last_prefill_s, engine.last_decode_s,
                      engine.kv_tokens, ended, time.time(), engine.last_decode_rows,
                      engine.last_prefill_tokens, engine.prefixes.stats.snapshot())


DEFAULT_AHEAD = 2
"""Steps the engine may run whose results the loop has not collected: one waiting for the
loop while the next computes."""


def checked_ahead(ahead: int) -> int:
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    return ahead


class EngineRunner(Protocol):
    async def start(self) -> None:
        """Warm the engine up and start stepping."""

    @property
    def free_device_bytes(self) -> int:
        """The accelerator's free memory once the engine had started (0 on a CPU)."""

    def submit(self, admitted: list[PreparedRequest], abandon: frozenset[int],
               cancel: frozenset[int]) -> None:
        """Work for the next step: requests to admit, and keys
        (:attr:`PreparedRequest.key`) of admitted requests to drop silently or end as
        cancelled."""

    @property
    def expecting(self) -> bool:
        """Whether a result is on its way for work posted or a step under way. (While the
        engine holds running jobs' sequences a result is on its way too: the loop knows
        those.)"""

    async def next_result(self) -> StepResult | Exception:
        """The next step's result, in step order, or what a failed step raised."""

    def recover(self) -> None:
        """After a failed step, once the loop has failed every running request: forget
        what was posted before, and step again."""

    def stop(self) -> None:
        """Stop stepping and release the engine."""
