"""Duplicate jobs: a producer that retries can write the same job twice — same key, so the
same partition, and the same request id, at another offset.

Pure: the request ids read lately per partition, each with the offset it was first read
at, bounded in count. A record whose request id (and submit time) was first read at
another offset of the same partition is a duplicate; the same offset read again (a
partition given back after a rebalance) is not. The submit time tells a retry (the same
bytes again) from the same id sent again on purpose, later: a batch file run a second
time is served a second time.
"""

from __future__ import annotations

from collections import OrderedDict

from aiokafka.structs import TopicPartition

REMEMBER_MAX = 200_000


class RecentRequests:
    def __init__(self, max_ids: int = REMEMBER_MAX) -> None:
        self._first: OrderedDict[tuple[TopicPartition, str, float | None], int] = OrderedDict()
        self._max_ids = max_ids

    def duplicate_of(self, tp: TopicPartition, request_id: str, offset: int,
                     submitted_at: float | None = None) -> int | None:
        """The offset this request was first read at, if that was another record; else
        None (and it is remembered as read at ``offset``)."""
        key = (tp, request_id, submitted_at)
        first = self._first.get(key)
        if first is not None and first != offset:
            self._first.move_to_end(key)
            return first
        self._first[key] = offset
        self._first.move_to_end(key)
        while len(self._first) > self._max_ids:
            self._first.popitem(last=False)
        return None
