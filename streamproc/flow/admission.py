"""Producer-side admission: whether a new job should go in, wait, or be refused.

Pure: the estimated drain time of the lane and the caller's policy in, a
decision out. The client applies it before publishing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Mode = Literal["block", "reject", "shed"]


@dataclass(frozen=True)
class AdmissionPolicy:
    mode: Mode = "block"
    max_drain_s: float = 30.0
    """Above this estimated drain time the lane counts as overloaded."""
    timeout_s: float = 60.0
    """``block``: how long to wait for the drain time to fall before giving up."""
    shed_below_priority: int = 1
    """``shed``: jobs with a lower priority are refused first; others wait as with ``block``."""


@dataclass(frozen=True)
class Decision:
    action: Literal["admit", "wait", "refuse"]
    retry_after_s: float = 0.0


def decide(policy: AdmissionPolicy, drain_s: float, priority: int) -> Decision:
    if drain_s <= policy.max_drain_s:
        return Decision("admit")
    excess = drain_s - policy.max_drain_s
    retry_after = policy.max_drain_s if math.isinf(excess) else excess
    if policy.mode == "reject":
        return Decision("refuse", retry_after)
    if policy.mode == "shed" and priority < policy.shed_below_priority:
        return Decision("refuse", retry_after)
    return Decision("wait", retry_after)
