"""Lag arithmetic and consumer-group health, in the spirit of Burrow.

Pure: offsets, timestamps and throughput figures in; numbers and a status out.
The lag monitor (:mod:`streamproc.metrics.lag_monitor`) gathers the inputs from the broker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

Status = Literal["OK", "WARN", "STALL", "STOP"]


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed: int | None
    """None when the group never committed on this partition."""
    oldest_age_s: float
    """Age of the oldest record not yet committed (0 when there is no lag)."""
    drain_s: float
    """Estimated seconds to work off the lag at the current throughput (inf: no throughput)."""

    @property
    def lag(self) -> int:
        return max(0, self.end_offset - (self.committed or 0))


@dataclass(frozen=True)
class Throughput:
    """What the group's workers report about themselves."""

    tokens_per_s: float
    avg_tokens_per_request: float
    workers: int


def drain_time_s(lag: int, throughput: Throughput) -> float:
    """lag * average tokens per request / current tokens per second."""
    if lag <= 0:
        return 0.0
    if throughput.tokens_per_s <= 0:
        return math.inf
    return lag * throughput.avg_tokens_per_request / throughput.tokens_per_s


@dataclass(frozen=True)
class GroupSample:
    """One look at a group: total lag, total committed offset, whether it has members."""

    at: float
    lag: int
    committed: int
    members: int


def group_status(window: Sequence[GroupSample]) -> Status:
    """Judge the group from its recent samples (oldest first).

    * STOP  — lag > 0 and the group has no members: nothing can commit.
    * STALL — lag > 0, members present, committed offsets did not move over the window.
    * WARN  — committed offsets move, but lag grew at every sample of the window.
    * OK    — otherwise (lag zero, shrinking, or holding steady).
    """
    if not window:
        return "OK"
    last = window[-1]
    if last.lag == 0:
        return "OK"
    if last.members == 0:
        return "STOP"
    if len(window) < 2:
        return "OK"
    if all(s.committed == window[0].committed for s in window):
        return "STALL"
    growing = all(b.lag > a.lag for a, b in pairwise(window))
    return "WARN" if growing else "OK"
