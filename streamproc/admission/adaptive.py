"""The adaptive admission window: how long to gather arrivals, and how many to admit.

Pure: latencies in, a window and an admission size out. Two knobs trade time to
first token against inter-token latency. A longer window and a larger admission
size batch more prefills together (fewer interruptions of the running batch,
better throughput) but make newcomers wait; every prefill lengthens the step
that carries it, which is what running sequences feel as inter-token latency.

Every ``every_n_steps`` observations the controller compares smoothed p95
estimates with the targets:

* inter-token p95 above target * margin → admit fewer at once (* ``decrease``);
* else TTFT p95 above target * margin   → shorten the window (* ``decrease``);
* both below target * ``slack`` (the hysteresis band) → grow the admission
  size additively by ``admit_step``. The window grows by ``window_step_s``
  only while consumer lag is high (and both steps double: lean toward
  throughput); with no backlog to batch, waiting buys nothing, so the window
  steps back toward its minimum instead;
* otherwise hold — inside the band nothing moves, so it does not oscillate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.645


@dataclass
class SmoothedP95:
    """An exponentially weighted estimate of a latency's 95th percentile (mean + 1.645 sd)."""

    alpha: float = 0.1
    mean: float = 0.0
    variance: float = 0.0
    seen: int = 0

    def observe(self, value: float) -> None:
        if self.seen == 0:
            self.mean = value
        else:
            delta = value - self.mean
            self.mean += self.alpha * delta
            self.variance = (1 - self.alpha) * (self.variance + self.alpha * delta * delta)
        self.seen += 1

    @property
    def p95(self) -> float:
        return self.mean + Z_95 * math.sqrt(self.variance)


@dataclass(frozen=True)
class ControllerSettings:
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.1
    window_min_s: float = 0.001
    window_max_s: float = 0.100
    admit_min: int = 1
    admit_max: int = 32
    window_step_s: float = 0.002
    admit_step: int = 1
    decrease: float = 0.5
    margin: float = 1.2
    """Cut only when latency exceeds the target by this factor."""
    slack: float = 0.8
    """Grow only when latency is below this fraction of the target."""
    every_n_steps: int = 8
    lag_high: int = 0
    """Consumer lag above which to lean toward throughput (0: never)."""


@dataclass(frozen=True)
class Adjustment:
    window_s: float
    admit_size: int
    reason: str


class AdaptiveController:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.window_s = settings.window_min_s
        self.admit_size = max(settings.admit_min, settings.admit_max // 4)
        self.last_reason = "start"
        self.ttft = SmoothedP95()
        self.itl = SmoothedP95()
        self._steps = 0

    def observe_step(self, itl_s: float | None, ttfts_s: list[float]) -> None:
        if itl_s is not None:
            self.itl.observe(itl_s)
        for value in ttfts_s:
            self.ttft.observe(value)
        self._steps += 1

    def adjust(self, lag: int = 0) -> Adjustment | None:
        """Every ``every_n_steps`` steps, the new window and admission size, with why."""
        if self._steps < self.settings.every_n_steps:
            return None
        self._steps = 0
        reason = self._decide(lag)
        self.last_reason = reason
        return Adjustment(self.window_s, self.admit_size, reason)

    def _decide(self, lag: int) -> str:
        s = self.settings
        itl, ttft = self.itl.p95, self.ttft.p95
        if self.itl.seen and itl > s.itl_target_s * s.margin:
            self.admit_size = max(s.admit_min, int(self.admit_size * s.decrease))
            return "itl_over_target"
        if self.ttft.seen and ttft > s.ttft_target_s * s.margin:
            self.window_s = max(s.window_min_s, self.window_s * s.decrease)
            return "ttft_over_target"
        if itl < s.itl_target_s * s.slack and ttft < s.ttft_target_s * s.slack:
            if s.lag_high and lag > s.lag_high:
                self.window_s = min(s.window_max_s, self.window_s + 2 * s.window_step_s)
                self.admit_size = min(s.admit_max, self.admit_size + 2 * s.admit_step)
                return "slack_lag_high"
            self.window_s = max(s.window_min_s, self.window_s - s.window_step_s)
            self.admit_size = min(s.admit_max, self.admit_size + s.admit_step)
            return "slack"
        return "within_band"
