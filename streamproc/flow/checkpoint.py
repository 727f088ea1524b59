"""Commit only what is published.

Records finish out of order (a short request read later finishes earlier), so
a partition's committable offset is the lowest offset still in flight, or one
past the highest seen when nothing is. Committed offsets only move forward.
"""

from __future__ import annotations

from aiokafka.structs import TopicPartition


class Checkpoint:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        """A record was read and is now in flight."""
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        """Everything this record caused was acknowledged by the broker."""
        pending = self._pending.get(tp)
        if pending is not None:
            pending.discard(offset)

    def in_flight(self) -> int:
        """Records read and not yet done, over every partition."""
        return sum(len(p) for p in self._pending.values())

    def committable(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets that advanced since the last commit (Kafka's next-to-read)."""
        result = {}
        for tp, upper in self._next.items():
            if only is not None and tp not in only:
                continue
            pending = self._pending.get(tp)
            offset = min(pending) if pending else upper
            if offset > self._committed.get(tp, -1):
                result[tp] = offset
        return result

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            previous = self._committed.get(tp, -1)
            if offset < previous:
                raise AssertionError(f"commit for {tp} went backwards: {previous} -> {offset}")
            self._committed[tp] = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop all state for partitions this worker no longer owns."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
