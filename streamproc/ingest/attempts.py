"""Poison detection that survives the crash it is about: how many times each record was
running in the engine when its worker died, kept in Kafka.

A record that makes the engine process die (a prompt that trips a kernel bug, an
out-of-memory kill) would otherwise be read again by every worker that takes its partition,
and kill each in turn: one message stopping the group for good. So when a job enters the
engine its count goes up by one on the compacted attempts topic, and when it is done the
entry is removed; a clean handback (a rebalance, a drain that ran out of time) puts the
count back. What is left after a crash is a count of deaths. A worker reads the whole
topic when it starts, before any request; a record whose count reached the limit is
dead-lettered as ``poison`` with an error reply. A record one death from that limit runs
alone, so that only the record that kills the engine reaches it, not its innocent
batch-mates. (Records with fewer deaths still run batched: after a single crash, kill -9 or
out-of-memory, everything in flight has one death, and serving it one request at a time
would make every crash's recovery serial.)

Cost: two small messages per request (the mark at admission, the removal when done), and at
start one read of a topic that holds only the records in flight across the group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamproc import wire
from streamproc.flow.ledger import Ticket

log = logging.getLogger(__name__)
Key = tuple[str, int, int]


def _key(ticket: Ticket) -> Key:
    return (ticket.tp.topic, ticket.tp.partition, ticket.offset)


class AttemptLog:
    """The attempts topic as this worker sees it; ``topic`` empty: nothing is counted."""

    def __init__(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                 topic: str) -> None:
        self._consumer, self._producer, self._topic = consumer, producer, topic
        self._counts: dict[Key, int] = {}
        self._sends: set[asyncio.Task[None]] = set()

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
        log.info("attempts: %d records were running when a worker died", len(self._counts))

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
        return self._counts.get(_key(ticket), 0)

    def admitted(self, ticket: Ticket, attempts: int) -> None:
        """The record enters the engine, having been in it ``attempts`` times at a death."""
        self._mark(ticket, attempts + 1)

    def handed_back(self, ticket: Ticket, attempts: int) -> None:
        """The record left this worker cleanly while it ran: that was no death."""
        self._mark(ticket, attempts)

    def done(self, ticket: Ticket) -> None:
        """The record is done: its entry, if it has one, goes."""
        if self._counts.pop(_key(ticket), None) is not None:
            self._send(ticket, None)

    def _mark(self, ticket: Ticket, attempts: int) -> None:
        self._counts[_key(ticket)] = attempts
        if attempts == 0:
            self._send(ticket, None)
            return
        mark = wire.AttemptMark(ticket.tp.topic, ticket.tp.partition, ticket.offset, attempts,
                                time.time())
        self._send(ticket, wire.encode(mark))

    def _send(self, ticket: Ticket, value: bytes | None) -> None:
        if not self.enabled:
            return
        key = "/".join(map(str, _key(ticket))).encode()
        task = asyncio.ensure_future(self._deliver(key, value))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _deliver(self, key: bytes, value: bytes | None) -> None:
        try:
            await (await self._producer.send(self._topic, value, key=key))
        except KafkaError as exc:  # a lost mark costs one death's count, never a request
            log.warning("attempt mark %s not published: %s", key.decode(), exc)

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
            self._counts.pop(parsed, None)
            return
        try:
            self._counts[parsed] = wire.attempt_decoder.decode(value).attempts
        except Exception as exc:  # malformed: one record must not stop the worker
            log.warning("ignoring a malformed attempts record: %s", exc)
