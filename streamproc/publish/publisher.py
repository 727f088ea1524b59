"""Publishing each request's stream to its reply topic, in ``seq`` order.

Messages are keyed by request id, so one request's stream lands in one
partition and the idempotent producer keeps it in order. The send of every
message is queued without waiting; only the terminal message's acknowledgement
is awaited (in the background) before its offset is marked done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streamproc import wire
from streamproc.channel import Job
from streamproc.engine.sequence import TokenEvent
from streamproc.logs import record_context

log = logging.getLogger(__name__)
OnAcked = Callable[[TopicPartition, int], None]


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, dead_letter_topic: str,
                 on_acked: OnAcked, *, coalesce_above: int = 1000) -> None:
        """``coalesce_above``: with more sends than this unacknowledged, later chunks of a
        stream are merged until the producer catches up (a first chunk never waits)."""
        self._producer = producer
        self._dead_letter_topic = dead_letter_topic
        self._on_acked = on_acked
        self._coalesce_above = coalesce_above
        self._next_seq: dict[tuple[TopicPartition, int], int] = {}
        self._held: dict[tuple[TopicPartition, int], tuple[str, list[int]]] = {}
        self._acks: set[asyncio.Task[None]] = set()
        self._unacked = 0

    async def publish(self, job: Job, event: TokenEvent) -> None:
        """Send what ``event`` adds to ``job``'s stream."""
        ending = event.outcome is not None
        if event.token_ids or event.text or (ending and job.key in self._held):
            await self._chunk(job, event.text, event.token_ids, final=ending)
        if event.outcome is not None:
            o = event.outcome
            final = wire.FinalMessage(job.request_id, self._seq(job), o.finish_reason, o.usage,
                                      o.timings, o.detail, job.attempt)
            await self._finish(job, final)

    async def fail(self, job: Job, code: str, message: str, retriable: bool = False) -> None:
        """End ``job``'s stream with an error message."""
        if job.key in self._held:  # what was generated goes out before the end
            await self._chunk(job, "", [], final=True)
        await self._finish(job, wire.ErrorMessage(job.request_id, self._seq(job), code, message,
                                                  retriable, job.attempt))

    async def reject(self, reply_topic: str, request_id: str, tp: TopicPartition, offset: int,
                     code: str, message: str) -> None:
        """Answer a request that never became a job (it failed validation)."""
        ack = await self._send(reply_topic, request_id,
                               wire.ErrorMessage(request_id, 0, code, message, False))
        self._track(ack, tp, offset)

    async def dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> None:
        letter = wire.DeadLetter(reason=reason, detail=detail, topic=record.topic,
                                 partition=record.partition, offset=record.offset,
                                 original=record.value or b"", key=record.key)
        ack = await self._producer.send(self._dead_letter_topic, wire.encode(letter),
                                        key=record.key)
        self._track(ack, TopicPartition(record.topic, record.partition), record.offset)

    async def flush(self) -> None:
        """Wait until every queued message is acknowledged (or failed)."""
        await self._producer.flush()
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)

    def forget(self, job: Job) -> None:
        """``job`` was abandoned (its partition moved): drop its sequence counter."""
        self._next_seq.pop(job.key, None)
        self._held.pop(job.key, None)

    async def _chunk(self, job: Job, text: str, tokens: list[int], *, final: bool) -> None:
        held_text, held_tokens = self._held.pop(job.key, ("", []))
        text, tokens = held_text + text, held_tokens + tokens
        started = job.key in self._next_seq
        if started and not final and self._unacked > self._coalesce_above:
            self._held[job.key] = (text, tokens)  # Kafka is behind: merge into a later chunk
            return
        chunk = wire.TokenChunk(job.request_id, self._seq(job), text, tokens, job.attempt)
        await self._send(job.reply_topic, job.request_id, chunk)

    def _seq(self, job: Job) -> int:
        # Keyed by record, not request id: two jobs may reuse an id.
        seq = self._next_seq.get(job.key, 0)
        self._next_seq[job.key] = seq + 1
        return seq

    async def _finish(self, job: Job, final: wire.FinalMessage | wire.ErrorMessage) -> None:
        self._next_seq.pop(job.key, None)
        ack = await self._send(job.reply_topic, job.request_id, final)
        self._track(ack, job.tp, job.offset)

    async def _send(self, topic: str, request_id: str,
                    message: wire.ResponseMessage) -> asyncio.Future[object]:
        future: asyncio.Future[object] = await self._producer.send(
            topic, wire.encode(message), key=request_id.encode())
        self._unacked += 1
        future.add_done_callback(self._acked_one)
        return future

    def _acked_one(self, _: asyncio.Future[object]) -> None:
        self._unacked -= 1

    def _track(self, ack: asyncio.Future[object], tp: TopicPartition, offset: int) -> None:
        task = asyncio.ensure_future(self._await_ack(ack, tp, offset))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _await_ack(self, ack: asyncio.Future[object], tp: TopicPartition,
                         offset: int) -> None:
        try:
            await ack
        except Exception:
            # Not marked done: the record is read again after a restart or rebalance.
            log.exception("publish failed for %s[%d]@%d; it will be redelivered", tp.topic,
                          tp.partition, offset,
                          extra=record_context(tp.topic, tp.partition, offset))
            return
        self._on_acked(tp, offset)
