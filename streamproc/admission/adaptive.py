"""The adaptive admission window: how long to gather arrivals, and how many to admit.

Pure: latencies in, a window and an admission size out. Two knobs trade time to
first token against inter-token latency. A longer window and a larger admission
size batch more prefills together (fewer interruptions of the running batch,
better throughput) but make newcomers wait; every prefill lengthens the step
that carries it, which is what running sequences feel as inter-token latency.

A third knob, the running cap, bounds how many sequences decode together:
where a step's cost grows with the batch (compute-bound models, CPUs), that
size is what sets inter-token latency between prefills.

Every ``every_n_steps`` observations the controller compares p95 estimates
over recent observations with the targets:

* inter-token p95 above target * margin → admit fewer at once
  (* ``decrease``: smaller prefills interrupt for less time); when decode-only
  steps alone take over ``slack`` * target, the batch itself is the cause, so
  also cap the running batch below its present size (* ``decrease``; running
  sequences are never preempted, the batch shrinks as they finish);
* else TTFT p95 above target * margin   → shorten the window (* ``decrease``),
  unless consumer lag is high: then the wait in the queue, not the window, is
  what makes first tokens late;
* both below target * ``slack`` (the hysteresis band), or inter-token latency
  alone while consumer lag is high → grow the admission size additively by
  ``admit_step`` and the running cap by ``running_step`` (1/16 of its range
  unless set). The window grows by ``window_step_s`` only while consumer lag
  is high (and both steps double: lean toward throughput); with no backlog to
  batch, waiting buys nothing, so the window steps back toward its minimum
  instead;
* otherwise hold — inside the band nothing moves, so it does not oscillate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from streamproc.metrics.stats import percentile


@dataclass
class RecentP95:
    """The 95th percentile of the last ``size`` observations.

    A window rather than mean + 1.645 sd: step times are bimodal (decode-only
    steps, and the few that also carry a prefill), and a normal approximation
    lets a handful of prefill spikes inflate the estimate far above the real
    p95, which would starve the batch for no reason.
    """

    size: int = 128
    _values: deque[float] = field(default_factory=deque)

    def observe(self, value: float) -> None:
        self._values.append(value)
        if len(self._values) > self.size:
            self._values.popleft()

    @property
    def seen(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()

    @property
    def p95(self) -> float:
        return percentile(list(self._values), 95)


@dataclass(frozen=True)
class ControllerSettings:
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.1
    window_min_s: float = 0.001
    window_max_s: float = 0.100
    admit_min: int = 1
    admit_max: int = 32
    running_max: int = 32
    """The running cap's ceiling: the engine's largest batch."""
    window_step_s: float = 0.002
    admit_step: int = 1
    running_step: int = 0
    """Additive growth of the running cap; 0: 1/16 of ``running_max``."""
    decrease: float = 0.5
    margin: float = 1.2
    """Cut only when latency exceeds the target by this factor."""
    slack: float = 0.8
    """Grow only when latency is below this fraction of the target."""
    every_n_steps: int = 8
    min_itl_samples: int = 32
    """Steps to observe after an inter-token cut before judging again: each cut is judged
    on what followed it, not on the slow steps that caused it (one cut per measurement)."""
    lag_high: int = 0
    """Consumer lag above which to lean toward throughput (0: never)."""


@dataclass(frozen=True)
class Adjustment:
    window_s: float
    admit_size: int
    running_cap: int
    reason: str


class AdaptiveController:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.window_s = settings.window_min_s
        self.admit_size = max(settings.admit_min, settings.admit_max // 4)
        self.running_cap = settings.running_max
        self.last_reason = "start"
        self.ttft = RecentP95()
        self.itl = RecentP95()
        self.decode = RecentP95()
        """Decode-only step time: what the running batch alone costs per token."""
        self._steps = 0
        self._running = 0
        self._after_cut = False

    def observe_step(self, itl_s: float | None, ttfts_s: list[float], running: int = 0,
                     decode_s: float = 0.0) -> None:
        """One engine step: its longest token gap, its first-token times, how many
        sequences it held, and how long its decode alone took (0: none)."""
        if itl_s is not None:
            self.itl.observe(itl_s)
        if decode_s:
            self.decode.observe(decode_s)
        for value in ttfts_s:
            self.ttft.observe(value)
        self._running = max(self._running, running)
        self._steps += 1

    def adjust(self, lag: int = 0) -> Adjustment | None:
        """Every ``every_n_steps`` steps, the new window and admission size, with why."""
        if self._steps < self.settings.every_n_steps:
            return None
        self._steps = 0
        reason = self._decide(lag)
        self._running = 0
        self.last_reason = reason
        return Adjustment(self.window_s, self.admit_size, self.running_cap, reason)

    def _decide(self, lag: int) -> str:
        s = self.settings
        if self._after_cut and self.itl.seen < min(s.min_itl_samples, self.itl.size):
            return "measuring"
        self._after_cut = False
        itl, ttft = self.itl.p95, self.ttft.p95
        if itl > s.itl_target_s * s.margin:
            return self._cut_for_itl()
        backlog = bool(s.lag_high) and lag > s.lag_high
        # With a backlog, time to first token is mostly the wait in the queue: a shorter
        # window cannot shorten it, more tokens/s can. So it is not cut for, and with
        # inter-token slack the controller leans toward throughput.
        if self.ttft.seen and ttft > s.ttft_target_s * s.margin and not backlog:
            self.window_s = max(s.window_min_s, self.window_s * s.decrease)
            return "ttft_over_target"
        if itl < s.itl_target_s * s.slack and (backlog or ttft < s.ttft_target_s * s.slack):
            lean = 2 if backlog else 1
            self.admit_size = min(s.admit_max, self.admit_size + lean * s.admit_step)
            running_step = s.running_step or max(1, s.running_max // 16)
            self.running_cap = min(s.running_max, self.running_cap + lean * running_step)
            if lean > 1:
                self.window_s = min(s.window_max_s, self.window_s + 2 * s.window_step_s)
                return "slack_lag_high"
            self.window_s = max(s.window_min_s, self.window_s - s.window_step_s)
            return "slack"
        return "within_band"

    def _cut_for_itl(self) -> str:
        s = self.settings
        # Smaller prefills interrupt the running batch for less time.
        self.admit_size = max(s.admit_min, int(self.admit_size * s.decrease))
        reason = "itl_over_target"  # prefills, not the batch, are to blame ...
        if self.decode.p95 > s.itl_target_s * s.slack:
            # ... unless decoding alone is slow: cap the batch below the size that was too
            # slow, not below a cap it never reached.
            biggest = min(self.running_cap, self._running or self.running_cap)
            self.running_cap = max(s.admit_min, int(biggest * s.decrease))
            reason = "itl_over_target_batch"
        self.itl.clear()
        self.decode.clear()
        self._after_cut = True
        return reason
