"""What an engine step costs, learned online from the steps the engine reports.

A step decodes one token for each of its B running rows, then prefills the prompts it
admitted. On a compute-bound device both parts grow with their size: decode as
``a + b·B`` seconds (the weights are read once a step, each row adds its own work),
prefill as ``c + d·T`` for T prompt tokens (a pass's fixed cost, then per token). Each
line is fitted by least squares over recent steps, older steps weighing less
(exponential forgetting), so the fit follows a device that slows down or speeds up.

Pure: numbers in, predictions out; no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class StepCosts:
    decode: LinearCost
    """Seconds to decode one token for B rows."""
    prefill: LinearCost
    """Seconds to prefill T prompt tokens."""

    @classmethod
    def fresh(cls) -> StepCosts:
        return cls(LinearCost(), LinearCost())

    def observe(self, decode_rows: int, decode_s: float, prefill_tokens: int,
                prefill_s: float) -> None:
        if decode_rows and decode_s > 0:
            self.decode.observe(decode_rows, decode_s)
        if prefill_tokens and prefill_s > 0:
            self.prefill.observe(prefill_tokens, prefill_s)

    def prefill_s(self, tokens: int) -> float:
        return self.prefill.predict(tokens) if tokens else 0.0

    def decode_s(self, rows: int) -> float:
        return self.decode.predict(rows) if rows else 0.0
