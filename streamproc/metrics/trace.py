"""A step-by-step record of the engine and the controller, for diagnosis.

With ``--trace-file`` a worker writes one JSON object per line: every engine step (its
time, rows decoded, prompt tokens prefilled, how long each part took, the running cap)
and every controller decision (why, the window, the cap, the budget's gain). The
benchmark turns it on for its streamproc run, so a run's behaviour can be read back
without running inference again.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import msgspec

from streamproc.admission.adaptive import Adjustment


class StepRecord(msgspec.Struct, tag="step"):
    at: float
    """Monotonic seconds at the step's end."""
    rows: int
    decode_s: float
    prefill_tokens: int
    prefill_s: float
    busy_s: float
    running: int
    """Requests the worker had in the engine (rows and prompts still prefilling)."""
    admitted: int
    """Requests the policy admitted into this step."""
    cap: int
    waiting: int


class DecisionRecord(msgspec.Struct, tag="decision"):
    at: float
    reason: str
    window_s: float
    cap: int
    gain: float


class StepTrace:
    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = path.open("wb")
        self._encoder = msgspec.json.Encoder()

    def step(self, record: StepRecord) -> None:
        self._write(record)

    def decision(self, adjustment: Adjustment) -> None:
        self._write(DecisionRecord(adjustment.at, adjustment.reason, adjustment.window_s,
                                   adjustment.running_cap, adjustment.gain))

    def _write(self, record: msgspec.Struct) -> None:
        self._file.write(self._encoder.encode(record) + b"\n")

    def close(self) -> None:
        self._file.close()


def read_trace(path: Path) -> list[StepRecord | DecisionRecord]:
    decoder = msgspec.json.Decoder(StepRecord | DecisionRecord)
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line]


def as_columns(records: list[StepRecord | DecisionRecord]) -> dict[str, Any]:
    """A trace as a report holds it: the steps as columns (times in ms, ``at`` in seconds
    from the first record) and the decisions as a list."""
    if not records:
        return {"steps": {}, "decisions": []}
    start = records[0].at
    steps = [r for r in records if isinstance(r, StepRecord)]
    columns: dict[str, list[float]] = {
        "at_s": [round(r.at - start, 4) for r in steps],
        "decode_ms": [round(r.decode_s * 1000, 2) for r in steps],
        "prefill_ms": [round(r.prefill_s * 1000, 2) for r in steps],
        "busy_ms": [round(r.busy_s * 1000, 2) for r in steps]}
    for name in ("rows", "prefill_tokens", "running", "admitted", "cap", "waiting"):
        columns[name] = [getattr(r, name) for r in steps]
    decisions = [{"at_s": round(r.at - start, 4), "reason": r.reason,
                  "window_ms": round(r.window_s * 1000, 2), "cap": r.cap, "gain": r.gain}
                 for r in records if isinstance(r, DecisionRecord)]
    return {"steps": columns, "decisions": decisions}
