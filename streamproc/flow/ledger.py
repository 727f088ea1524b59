"""The one owner of what a worker holds: records in flight, what they cost, what was
committed, per partition and per assignment of it.

Pure: reads, acknowledgements and commits in; committable offsets and a fetch gate out.

Every time a partition is assigned it gets a new **epoch**, and every record read gets a
:class:`Ticket` naming it. An acknowledgement or a commit result that carries an older
epoch than the partition's current one (or a partition no longer held) is ignored: an ack
arriving after its partition was revoked cannot mark done an offset being served again by
this worker's next assignment, and a commit computed before a rebalance cannot move the
watermark of the assignment after it.

Records finish out of order (a short request read later finishes earlier), so a
partition's committable offset is the lowest offset still in flight, or one past the
highest read when nothing is. Committed offsets only move forward within an epoch.

Each record counts against the request cap from the moment it is read until everything
it caused is acknowledged; its tokens (prompt + ``max_new_tokens``) count against the
token cap for as long. Fetching pauses at either cap and resumes only below ``low_water``
of both, so the consumer does not flap between paused and fetching on every record.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from aiokafka.structs import TopicPartition

Gate = Literal["pause", "resume", "hold"]


@dataclass(frozen=True)
class Ticket:
    """One record read under one assignment of its partition."""

    tp: TopicPartition
    offset: int
    epoch: int


@dataclass
class _Held:
    tokens: int = 0
    work: int = 0


@dataclass
class _Partition:
    epoch: int
    next_offset: int | None = None
    """One past the highest offset read (None: nothing read under this epoch)."""
    committed: int = -1
    held: dict[int, _Held] = field(default_factory=dict)
    """Offsets in flight -> what they cost."""


_epochs = itertools.count(1)


class Ledger:
    def __init__(self, max_requests: int, max_tokens: int, low_water: float = 0.75) -> None:
        self.max_requests, self.max_tokens, self.low_water = max_requests, max_tokens, low_water
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._requests = self._tokens = self._work = 0

    # Assignment.
    def assign(self, partitions: set[TopicPartition]) -> None:
        """``partitions`` are (again) this worker's: each starts a new epoch, afresh."""
        self.revoke(partitions)
        for tp in partitions:
            self._partitions[tp] = _Partition(next(_epochs))

    def revoke(self, partitions: set[TopicPartition]) -> list[Ticket]:
        """Forget ``partitions``; the tickets that were still in flight."""
        dropped = []
        for tp in partitions:
            state = self._partitions.pop(tp, None)
            if state is None:
                continue
            for offset, held in state.held.items():
                self._count(held, -1)
                dropped.append(Ticket(tp, offset, state.epoch))
        return dropped

    def owns(self, ticket: Ticket) -> bool:
        state = self._partitions.get(ticket.tp)
        return state is not None and state.epoch == ticket.epoch

    # Records.
    def read(self, tp: TopicPartition, offset: int) -> Ticket:
        """A record was read and is now in flight (a partition not assigned explicitly is
        assigned by its first record)."""
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = _Partition(next(_epochs))
        state.next_offset = max(state.next_offset or 0, offset + 1)
        held = state.held.pop(offset, None)
        if held is not None:
            self._count(held, -1)
        state.held[offset] = _Held()
        self._requests += 1
        return Ticket(tp, offset, state.epoch)

    def cost(self, ticket: Ticket, tokens: int, work: int) -> None:
        """What ``ticket``'s record holds once prepared: KV tokens, tokens to generate."""
        held = self._held(ticket)
        if held is None:
            return
        self._tokens += tokens - held.tokens
        self._work += work - held.work
        held.tokens, held.work = tokens, work

    def done(self, ticket: Ticket) -> bool:
        """Everything ``ticket``'s record caused was acknowledged; False (and nothing
        changes) if it belongs to an earlier assignment."""
        if self._held(ticket) is None:
            return False
        held = self._partitions[ticket.tp].held.pop(ticket.offset)
        self._count(held, -1)
        return True

    def _held(self, ticket: Ticket) -> _Held | None:
        if not self.owns(ticket):
            return None
        return self._partitions[ticket.tp].held.get(ticket.offset)

    def _count(self, held: _Held, sign: int) -> None:
        self._requests += sign
        self._tokens += sign * held.tokens
        self._work += sign * held.work

    # Commits.
    def committable(self, only: set[TopicPartition] | None = None
                    ) -> dict[TopicPartition, tuple[int, int]]:
        """Per partition whose watermark advanced since its last commit: (offset, epoch)."""
        result = {}
        for tp, state in self._partitions.items():
            if (only is not None and tp not in only) or state.next_offset is None:
                continue
            offset = min(state.held) if state.held else state.next_offset
            if offset > state.committed:
                result[tp] = (offset, state.epoch)
        return result

    def committed(self, offsets: dict[TopicPartition, tuple[int, int]]) -> None:
        """Offsets the broker took; those of an earlier assignment are ignored."""
        for tp, (offset, epoch) in offsets.items():
            state = self._partitions.get(tp)
            if state is None or state.epoch != epoch:
                continue
            if offset < state.committed:
                raise AssertionError(f"commit for {tp} went backwards: "
                                     f"{state.committed} -> {offset}")
            state.committed = offset

    # What is held, and the fetch gate.
    @property
    def requests(self) -> int:
        return self._requests

    @property
    def tokens(self) -> int:
        """Prompt + max new tokens held: what the KV cache may have to hold."""
        return self._tokens

    @property
    def work(self) -> int:
        """Tokens still to be generated for what is held, at most."""
        return self._work

    def next_offset(self, tp: TopicPartition) -> int | None:
        state = self._partitions.get(tp)
        return state.next_offset if state is not None else None

    def room(self) -> int:
        """How many more records may be read now (at least 1, so polling continues)."""
        return max(1, self.max_requests - self._requests)

    def gate(self, paused: bool) -> Gate:
        full = self._requests >= self.max_requests or self._tokens >= self.max_tokens
        if not paused:
            return "pause" if full else "hold"
        low = (self._requests <= self.max_requests * self.low_water
               and self._tokens <= self.max_tokens * self.low_water)
        return "resume" if low else "hold"
