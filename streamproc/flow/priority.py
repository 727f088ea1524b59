"""Priority lanes: which lower lanes to stop fetching while a higher one has a backlog.

Pure. Lanes are ranked 0 (highest) upward. When a lane holds at least
``backlog`` waiting requests, every lane ranked below it is paused, so the
worker's capacity goes to the higher lane and the lower lanes' backlog stays
in Kafka. With no such backlog nothing is paused.
"""

from __future__ import annotations


def lanes_to_pause(waiting_by_rank: list[int], backlog: int) -> set[int]:
    for rank, waiting in enumerate(waiting_by_rank):
        if waiting >= backlog:
            return set(range(rank + 1, len(waiting_by_rank)))
    return set()
