"""Which records a worker started, and how many times each was running in the engine when
its worker died, kept in Kafka: takeovers and poison detection survive the crash they are
about.

Started: a record with an entry may have chunks on its reply topic, so its next owner
takes it over (:mod:`streamproc.ingest.resume`) instead of starting afresh; a stream's
first chunk goes out only once its record's mark is acknowledged. An entry goes once the
record's offset is committed — not when its stream ends: a worker that lost its partitions
without knowing it yet cannot commit (the group fences it), so it cannot erase what the
record's next owner relies on.

A record that makes the engine process die (a prompt that trips a kernel bug, an
out-of-memory kill) would otherwise be read again by every worker that takes its partition,
and kill each in turn: one message stopping the group for good. So when a job enters the
engine its count goes up by one on the compacted attempts topic, and when it is done the
entry is removed; a clean handback (a rebalance, a drain that ran out of time) puts the
count back (an entry with no deaths still says "started"). What is left after a crash is
a count of deaths. A worker reads the whole
topic when it starts, before any request; a record whose count reached the limit is
dead-lettered as ``poison`` with an error reply. A record one death from that limit runs
alone, so that only the record that kills the engine reaches it, not its innocent
batch-mates. (Records with fewer deaths still run batched: after a single crash, kill -9 or
out-of-memory, everything in flight has one death, and serving it one request at a time
would make every crash's recovery serial.)

Cost: two small messages per request (the mark at admission, the removal after the
commit), and at start one read of a topic that holds only the records in flight across
the group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamproc import wire
from streamproc.errors import PublishError
from streamproc.flow.ledger import Ticket

log = logging.getLogger(__name__)
Key = tuple[str, int, int]


@dataclass(frozen=True)
class Entry:
    deaths: int
    since: float
    """When a worker first started the record (wall-clock seconds)."""


def _key(ticket: Ticket) -> Key:
    return (ticket.tp.topic, ticket.tp.partition, ticket.offset)


class AttemptLog:
    """The attempts topic as this worker sees it; ``topic`` empty: nothing is counted."""

    def __init__(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                 topic: str) -> None:
        self._consumer, self._producer, self._topic = consumer, producer, topic
        self._entries: dict[Key, Entry] = {}
        self._finished: dict[TopicPartition, set[int]] = defaultdict(set)
        """Done records whose entries go once their offsets are committed."""
        self._sends: set[asyncio.Task[bool]] = set()
        self._marks: dict[Key, asyncio.Task[bool]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._topic)

    async def start(self, partitions: set[int]) -> None:
        """Read the whole topic (compacted: what is in flight across the group)."""
        if not self.enabled:
            return
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        while [tp for tp in tps if await self._consumer.position(tp) < ends[tp]]:
            self._take(await self._consumer.getmany(*tps, timeout_ms=1000))
        log.info("attempts: %d records were started by workers that did not finish them",
                 len(self._entries))

    async def stop(self) -> None:
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self.enabled:
            await self._consumer.stop()

    async def run(self) -> None:
        """Follow the topic (other workers' marks for partitions this one may take over)."""
        while True:
            self._take(await self._consumer.getmany(timeout_ms=1000))

    def count(self, ticket: Ticket) -> int:
        entry = self._entries.get(_key(ticket))
        return entry.deaths if entry is not None else 0

    def started(self, ticket: Ticket) -> float | None:
        """When a worker first started this record, if one did (and it is not done)."""
        entry = self._entries.get(_key(ticket))
        return entry.since if entry is not None else None

    def admitted(self, ticket: Ticket, attempts: int) -> None:
        """The record enters the engine, having been in it ``attempts`` times at a death."""
        self._mark(ticket, attempts + 1)

    def handed_back(self, ticket: Ticket, attempts: int) -> None:
        """The record left this worker cleanly while it ran: that was no death (and it
        stays marked as started)."""
        self._mark(ticket, attempts)

    async def durable(self, ticket: Ticket) -> None:
        """Return once the record's mark is on the broker: before its stream's first chunk,
        so that whoever takes the record over knows it was started. Raises
        :class:`PublishError` when the broker would not take it."""
        mark = self._marks.get(_key(ticket))
        if mark is not None and not await mark:
            raise PublishError(f"the attempts mark of {'/'.join(map(str, _key(ticket)))} "
                               "was not published: its stream cannot start safely")

    def done(self, ticket: Ticket) -> None:
        """The record is done: its entry, if it has one, goes once its offset is
        committed (:meth:`committed`)."""
        self._marks.pop(_key(ticket), None)
        if _key(ticket) in self._entries:
            self._finished[ticket.tp].add(ticket.offset)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """The group committed ``offsets``: entries of done records below them go."""
        for tp, committed in offsets.items():
            below = {o for o in self._finished.get(tp, ()) if o < committed}
            self._finished[tp] -= below
            for offset in below:
                ticket_key = (tp.topic, tp.partition, offset)
                if self._entries.pop(ticket_key, None) is not None:
                    self._send(ticket_key, None)

    def revoked(self, partitions: set[TopicPartition]) -> None:
        """Their next owner reads those entries and removes them after its own commit."""
        for tp in partitions:
            self._finished.pop(tp, None)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        for key in [k for k in self._marks if k[:2] in gone]:
            del self._marks[key]

    def _mark(self, ticket: Ticket, attempts: int) -> None:
        key = _key(ticket)
        known = self._entries.get(key)
        since = known.since if known is not None else time.time()
        self._entries[key] = Entry(attempts, since)
        mark = wire.AttemptMark(ticket.tp.topic, ticket.tp.partition, ticket.offset, attempts,
                                time.time(), since)
        self._marks[key] = self._send(key, wire.encode(mark))

    def _send(self, key: Key, value: bytes | None) -> asyncio.Task[bool]:
        task = asyncio.ensure_future(self._deliver("/".join(map(str, key)).encode(), value))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return task

    async def _deliver(self, key: bytes, value: bytes | None) -> bool:
        if not self.enabled:
            return True
        try:
            await (await self._producer.send(self._topic, value, key=key))
        except KafkaError as exc:
            log.warning("attempt mark %s not published: %s", key.decode(), exc)
            return False
        return True

    def _take(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        for records in fetched.values():
            for record in records:
                self._apply(record.key, record.value)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        try:
            topic, partition, offset = (key or b"").decode().rsplit("/", 2)
            parsed: Key = (topic, int(partition), int(offset))
        except (UnicodeDecodeError, ValueError):
            log.warning("ignoring an attempts record with key %r", key)
            return
        if value is None:
            self._entries.pop(parsed, None)
            return
        try:
            mark = wire.attempt_decoder.decode(value)
            self._entries[parsed] = Entry(mark.attempts, mark.since or mark.at)
        except Exception as exc:  # malformed: one record must not stop the worker
            log.warning("ignoring a malformed attempts record: %s", exc)
