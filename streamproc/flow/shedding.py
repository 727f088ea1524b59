"""Load shedding: answer at once a request that cannot meet its deadline.

Pure. The estimate is deliberately simple: every token the worker already
holds must be generated before this request's last one, at the worker's
measured rate. A request is shed only when that rate is known.
"""

from __future__ import annotations


def cannot_meet_deadline(now: float, deadline: float | None, backlog_tokens: int,
                         own_tokens: int, tokens_per_s: float) -> bool:
    if deadline is None or tokens_per_s <= 0:
        return False
    return now + (backlog_tokens + own_tokens) / tokens_per_s > deadline
