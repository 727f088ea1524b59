"""The adaptive controller: how many rows decode together, which waiting prompts join the
next step, and how long an idle engine gathers arrivals.

Pure: step figures and latencies in, decisions out; the clock is passed in.

Every running row waits one whole step for its next token, so the inter-token latency a
reader sees is the step time: the decode of B rows plus whatever prefill the step
carries. The controller learns both costs online (:mod:`streamproc.admission.costs`) and
decides **every step**:

* **running cap** — the most rows whose decode step fits the inter-token budget
  (``itl_target_s`` x ``gain``);
* **admission** — while the engine is busy, waiting prompts join from the head of the
  queue as long as the step's predicted cost (decode of the running rows, the chunk of
  a long prompt under way, their prefill) fits the budget. Prompts that never fit are
  not starved: an allowance of over-budget steps (``overrun_share`` of all steps, below
  the 5% a p95 tolerates) admits them, as many as the cap has room for, since a gap that
  is late counts the same in a p95 however late it is. (On a CPU a prefill pass reads
  every weight once, as a decode step does: one prompt's prefill alone can exceed an
  inter-token target, and then every admission is such a step.) An idle engine has no
  reader to keep waiting: it admits up to the cap, after gathering for ``window_s``.

Feedback corrects what the model misses (other processes on the cores, a kernel that
slows down): latencies are observed over ``horizon_s`` seconds, not a count of steps, and
judged at most every ``judge_every_s``:

* inter-token p95 over target → ``gain`` x ``cut`` (the budget shrinks) and the samples
  are cleared, so the next judgment sees only what followed the cut;
* inter-token p95 under ``slack`` x target → ``gain`` grows by ``grow`` (up to 1), and
  if the batch was held at its cap with prompts waiting, the cap may exceed the model's by
  one more row (the fit's slope can be too steep when it has seen few batch sizes);
* time to first token over target with no backlog → the idle window halves; with a
  backlog (consumer lag over ``lag_high``) the window grows: waiting then buys batching.

With ``itl_target_s`` 0 there is no inter-token target (throughput mode): the cap is
``running_max`` and every waiting prompt that fits the token budget joins.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from streamproc.admission.costs import StepCosts
from streamproc.metrics.stats import percentile


@dataclass
class TimedP95:
    """The 95th percentile of what was observed in the last ``horizon_s`` seconds."""

    horizon_s: float
    _values: deque[tuple[float, float]] = field(default_factory=deque)

    def observe(self, now: float, value: float) -> None:
        self._values.append((now, value))

    def _prune(self, now: float) -> None:
        while self._values and self._values[0][0] < now - self.horizon_s:
            self._values.popleft()

    def count(self, now: float) -> int:
        self._prune(now)
        return len(self._values)

    def p95(self, now: float) -> float:
        self._prune(now)
        return percentile([v for _, v in self._values], 95)

    def clear(self) -> None:
        self._values.clear()


@dataclass(frozen=True)
class ControllerSettings:
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.1
    """0: no inter-token target (throughput mode)."""
    window_min_s: float = 0.001
    window_max_s: float = 0.100
    window_step_s: float = 0.002
    running_max: int = 32
    """The running cap's ceiling: the engine's largest batch."""
    start_cap: int = 4
    """The running cap before any step was measured."""
    horizon_s: float = 5.0
    judge_every_s: float = 0.25
    min_samples: int = 40
    """Latency samples needed before a judgment: enough that a p95 is not their maximum
    (one late gap in 16 would be), so one admission's long step does not cut the budget."""
    overrun_share: float = 0.03
    gain_start: float = 0.9
    gain_min: float = 0.3
    cut: float = 0.8
    grow: float = 0.05
    slack: float = 0.8
    lag_high: int = 0
    """Consumer lag above which the idle window grows (0: never)."""


@dataclass(frozen=True)
class Adjustment:
    at: float
    reason: str
    window_s: float
    running_cap: int
    gain: float


class AdaptiveController:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.costs = StepCosts.fresh()
        self.window_s = settings.window_min_s
        self.gain = settings.gain_start
        self.itl = TimedP95(settings.horizon_s)
        self.ttft = TimedP95(settings.horizon_s)
        self.last_reason = "start"
        self.admitted = 0
        """How many prompts the last admission took (a gauge)."""
        self._credit = 1.0
        self._bonus = 0
        self._held_at_cap = False
        self._judged_at = float("-inf")
        self._grown_at = float("-inf")
        self._now = 0.0
        """The last step's time: what the measured row costs' ages are taken against."""
        self._cap_key: tuple[int, float, int, float] | None = None
        self._cap = 0
        self._last_cap = self.running_cap

    @property
    def itl_budget_s(self) -> float:
        return self.settings.itl_target_s * self.gain

    @property
    def running_cap(self) -> int:
        """Read several times a step: computed once per change of what it depends on."""
        key = (self.costs.version, self.gain, self._bonus, self._now)
        if key != self._cap_key:
            self._cap_key, self._cap = key, self._running_cap()
        return self._cap

    def _running_cap(self) -> int:
        s = self.settings
        if s.itl_target_s <= 0:
            return s.running_max
        if not self.costs.decode.known:
            return min(s.start_cap, s.running_max)
        budget, now = self.itl_budget_s, self._now
        cap = self.costs.rows_within(budget, s.running_max, now)
        if self.costs.rows.measured(cap + 1, now) is None and \
                self.costs.rows.measured(cap, now) is not None:
            cap += 1  # the next size up is only predicted to miss: try it
        return max(1, min(s.running_max, cap + self._bonus))

    def admission(self, waiting_tokens: list[int], running: int,
                  prefilling_tokens: int = 0) -> int:
        """How many of the waiting prompts (their token counts, head first) join the next
        step, beside ``running`` rows and a long prompt's chunk of ``prefilling_tokens``."""
        free = self.running_cap - running
        self._held_at_cap = free <= 0 and bool(waiting_tokens)
        if free <= 0 or not waiting_tokens:
            return 0
        if self.settings.itl_target_s <= 0 or running == 0:
            return self._took(waiting_tokens[:free])
        budget = (self.itl_budget_s - self.costs.decode_s(running)
                  - self.costs.prefill_s(prefilling_tokens))
        count, total = 0, 0
        for tokens in waiting_tokens[:free]:
            if self.costs.prefill_s(total + tokens) > budget:
                break
            count, total = count + 1, total + tokens
        if count == 0 and self._credit >= 1.0:
            # An over-budget step, so prompts that never fit are served. Its gap is late
            # whatever it carries, and a p95 counts late gaps, not how late: fill it.
            self._credit -= 1.0
            count = min(free, len(waiting_tokens))
        return self._took(waiting_tokens[:count])

    def _took(self, tokens: list[int]) -> int:
        self.admitted = len(tokens)
        return len(tokens)

    def observe_step(self, now: float, gaps_s: list[float], ttfts_s: list[float], *,
                     decode_rows: int = 0, decode_s: float = 0.0, prefill_tokens: int = 0,
                     prefill_s: float = 0.0) -> None:
        """One engine step: the token gaps its rows saw, its first tokens' latencies, and
        what its decode and prefill took."""
        self._now = now
        self.costs.observe(decode_rows, decode_s, prefill_tokens, prefill_s, now)
        overran = prefill_tokens > 0 and decode_s + prefill_s > self.settings.itl_target_s
        if decode_rows <= self.running_cap and not overran:
            # Judged: the decode budget's own steps. A batch above the cap (cut since it
            # was admitted) drains as its rows finish; its late gaps are already answered,
            # and judging them again would cut again. An admission's step over the target
            # is the allowance's, which :attr:`ControllerSettings.overrun_share` bounds;
            # cutting the decode budget for it would shrink every batch after it.
            for gap in gaps_s:
                self.itl.observe(now, gap)
        for value in ttfts_s:
            self.ttft.observe(now, value)
        self._credit = min(1.0, self._credit + self.settings.overrun_share)

    def adjust(self, now: float, lag: int = 0) -> Adjustment | None:
        """What changed since the last call, with why; None when nothing did."""
        reason = None
        if now - self._judged_at >= self.settings.judge_every_s:
            self._judged_at = now
            itl_reason = self._judge_itl(now)
            reason = self._judge_window(now, lag) or itl_reason
        cap = self.running_cap
        if reason is None and cap != self._last_cap:
            reason = "cost_model"
        self._last_cap = cap
        if reason is None:
            return None
        self.last_reason = reason
        return Adjustment(now, reason, self.window_s, cap, self.gain)

    def _judge_itl(self, now: float) -> str | None:
        s = self.settings
        if s.itl_target_s <= 0 or self.itl.count(now) < s.min_samples:
            return None
        p95 = self.itl.p95(now)
        if p95 > s.itl_target_s:
            self.gain = max(s.gain_min, self.gain * s.cut)
            self._bonus = 0
            self.itl.clear()  # judge the cut on what follows it
            return "itl_over_target"
        if p95 < s.itl_target_s * s.slack and now - self._grown_at >= s.horizon_s / 4:
            self._grown_at = now
            grown = self.gain < 1.0 or self._held_at_cap
            self.gain = min(1.0, self.gain + s.grow)
            self._bonus += 1 if self._held_at_cap else 0
            return "itl_slack" if grown else None
        return None

    def _judge_window(self, now: float, lag: int) -> str | None:
        s = self.settings
        backlog = bool(s.lag_high) and lag > s.lag_high
        if backlog:
            grown = min(s.window_max_s, self.window_s + s.window_step_s)
            changed, self.window_s = grown != self.window_s, grown
            return "lag_high" if changed else None
        if self.ttft.count(now) >= s.min_samples and self.ttft.p95(now) > s.ttft_target_s:
            self.window_s = max(s.window_min_s, self.window_s / 2)
            self.ttft.clear()
            return "ttft_over_target"
        self.window_s = max(s.window_min_s, self.window_s - s.window_step_s)
        return None
