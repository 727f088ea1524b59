"""What an engine step costs, learned online from the steps the engine reports.

A step decodes one token for each of its B running rows, then prefills the prompts it
admitted. On a compute-bound device both parts grow with their size: decode as
``a + b·B`` seconds (the weights are read once a step, each row adds its own work),
prefill as ``c + d·T`` for T prompt tokens (a pass's fixed cost, then per token). Each
line is fitted by least squares over recent steps, older steps weighing less
(exponential forgetting), so the fit follows a device that slows down or speeds up.

A line fitted over a few small batches can mislead: on a CPU, two or three rows may cost
more than four, and a slope read off sizes 1-3 then forbids every larger batch, which
is never tried, so the fit never learns better. :class:`RowCosts` therefore also keeps
what each row count actually measured, so a size seen to fit is trusted over the line,
and the next size up is tried when the line is the only thing against it.

Pure: numbers in, predictions out; no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORGET = 0.97
"""Weight kept by each older sample per new one: about the last 30 steps count."""
PRIOR_FIXED_SHARE = 0.5
"""While every sample has the same size, the slope is unknown: assume half the cost is
fixed and half grows with size. Batches then grow in steps and the fit sharpens."""


@dataclass
class LinearCost:
    """``y ≈ fixed + per_unit · x``, fitted over weighted samples."""

    forget: float = FORGET
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, x: float, y: float) -> None:
        f = self.forget
        self._w = self._w * f + 1.0
        self._x = self._x * f + x
        self._y = self._y * f + y
        self._xx = self._xx * f + x * x
        self._xy = self._xy * f + x * y

    @property
    def known(self) -> bool:
        return self._w > 0

    def line(self) -> tuple[float, float]:
        """(fixed, per unit), both >= 0; (0, 0) before any sample."""
        if not self._w:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        spread = self._xx / self._w - mean_x * mean_x
        if spread <= 1e-9 * max(1.0, mean_x * mean_x) or mean_x <= 0:
            per_unit = mean_y * PRIOR_FIXED_SHARE / max(mean_x, 1.0)
            return max(0.0, mean_y - per_unit * mean_x), per_unit
        per_unit = max(0.0, (self._xy / self._w - mean_x * mean_y) / spread)
        fixed = mean_y - per_unit * mean_x
        if fixed < 0:  # a line through the samples' mean that does not start below zero
            return 0.0, mean_y / mean_x
        return fixed, per_unit

    def predict(self, x: float) -> float:
        fixed, per_unit = self.line()
        return fixed + per_unit * x

    def largest_within(self, budget: float, ceiling: int) -> int:
        """The largest whole x in [0, ceiling] whose cost fits ``budget``."""
        fixed, per_unit = self.line()
        if budget < fixed:
            return 0
        if per_unit <= 0:
            return ceiling
        return max(0, min(ceiling, int((budget - fixed) / per_unit)))


ROW_FORGET = 0.7
"""Weight an average at one row count keeps per new sample there."""
ROW_STALE_S = 10.0
"""A row count not measured for this long is taken as unknown again, and may be retried."""


@dataclass
class RowCosts:
    """Decode seconds as measured at each row count (a recent-weighted average) and when
    each was last measured; sizes between measured ones are interpolated, sizes above them
    extrapolated from the largest."""

    seen: dict[int, tuple[float, float]] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float, now: float) -> None:
        average, _ = self.seen.get(rows, (seconds, now))
        self.seen[rows] = (average * ROW_FORGET + seconds * (1 - ROW_FORGET), now)

    def measured(self, rows: int, now: float) -> float | None:
        """What ``rows`` recently took, or None if not measured lately."""
        entry = self.seen.get(rows)
        if entry is None or now - entry[1] > ROW_STALE_S:
            return None
        return entry[0]

    def largest_within(self, budget: float, ceiling: int, now: float,
                       slope: float) -> int | None:
        """The largest row count in [0, ceiling] whose estimate fits ``budget``; None when
        nothing was measured lately (the line alone decides then)."""
        points = sorted((rows, seconds) for rows, (seconds, at) in self.seen.items()
                        if now - at <= ROW_STALE_S and rows <= ceiling)
        if not points:
            return None
        best, (low_rows, low_s) = 0, (0, 0.0)
        for high_rows, high_s in points:
            for rows in range(low_rows + 1, high_rows + 1):  # interpolated, then measured
                share = (rows - low_rows) / (high_rows - low_rows)
                if low_s + (high_s - low_s) * share <= budget and (low_rows or rows == high_rows
                                                                   or high_s <= budget):
                    best = rows
            low_rows, low_s = high_rows, high_s
        if low_s <= budget:  # above the largest measured: along the steeper of the line's
            # slope and the chord from the smallest measured size, as a CPU's decode
            # grows ever more slowly with rows, the chord errs towards fewer rows
            first_rows, first_s = points[0]
            if low_rows > first_rows:
                slope = max(slope, (low_s - first_s) / (low_rows - first_rows))
            room = (budget - low_s) / slope if slope > 0 else float(ceiling)
            best = max(best, min(ceiling, low_rows + int(room)))
        return best


@dataclass
class StepCosts:
    decode: LinearCost
    """Seconds to decode one token for B rows."""
    prefill: LinearCost
    """Seconds to prefill T prompt tokens."""
    rows: RowCosts = field(default_factory=RowCosts)
    """Decode as each row count measured it."""
    version: int = 0
    """Counts the steps observed, so what is derived from the costs knows when to redo."""

    @classmethod
    def fresh(cls) -> StepCosts:
        return cls(LinearCost(), LinearCost())

    def observe(self, decode_rows: int, decode_s: float, prefill_tokens: int,
                prefill_s: float, now: float = 0.0) -> None:
        self.version += 1
        if decode_rows and decode_s > 0:
            self.decode.observe(decode_rows, decode_s)
            self.rows.observe(decode_rows, decode_s, now)
        if prefill_tokens and prefill_s > 0:
            self.prefill.observe(prefill_tokens, prefill_s)

    def prefill_s(self, tokens: int) -> float:
        return self.prefill.predict(tokens) if tokens else 0.0

    def decode_s(self, rows: int) -> float:
        return self.decode.predict(rows) if rows else 0.0

    def rows_within(self, budget: float, ceiling: int, now: float) -> int:
        """The most rows whose decode fits ``budget``: as measured where measured lately,
        else as the line predicts."""
        anchored = self.rows.largest_within(budget, ceiling, now, self.decode.line()[1])
        if anchored is None:
            return self.decode.largest_within(budget, ceiling)
        return anchored
