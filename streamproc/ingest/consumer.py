"""The fetch loop: read request records, route each one, and stop reading when full.

Every record ends up exactly one of: a job in the waiting queue, an error
response on its reply topic, or a dead letter. Fetching pauses (without leaving
the group: the loop keeps polling) once the worker holds ``max_inflight``
records and resumes below the low-water mark.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streamproc.channel import Job, WaitingQueue
from streamproc.errors import RequestError
from streamproc.flow.checkpoint import Checkpoint
from streamproc.ingest.decode import Undecodable, decode_request
from streamproc.ingest.prepare import Preparer
from streamproc.publish.publisher import Publisher

log = logging.getLogger(__name__)
POLL_TIMEOUT_MS = 200
LOW_WATER = 0.75


class Ingest:
    def __init__(self, consumer: AIOKafkaConsumer, preparer: Preparer, waiting: WaitingQueue,
                 checkpoint: Checkpoint, publisher: Publisher, *, max_inflight: int,
                 max_message_bytes: int) -> None:
        self._consumer = consumer
        self._preparer = preparer
        self._waiting = waiting
        self._checkpoint = checkpoint
        self._publisher = publisher
        self._max_inflight = max_inflight
        self._max_bytes = max_message_bytes
        self.paused = False

    async def run(self) -> None:
        """Fetch until cancelled."""
        while True:
            self._apply_gate()
            room = max(1, self._max_inflight - self._checkpoint.in_flight())
            fetched = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=room)
            for tp, records in fetched.items():
                for record in records:
                    await self._route(tp, record)

    def _apply_gate(self) -> None:
        held = self._checkpoint.in_flight()
        if not self.paused and held >= self._max_inflight:
            self._consumer.pause(*self._consumer.assignment())
            self.paused = True
        elif self.paused and held <= self._max_inflight * LOW_WATER:
            self._consumer.resume(*self._consumer.assignment())
            self.paused = False
        elif self.paused:
            # Partitions assigned by a rebalance since we paused start unpaused.
            self._consumer.pause(*self._consumer.assignment())

    async def _route(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self._checkpoint.track(tp, record.offset)
        request = decode_request(record.value, self._max_bytes)
        if isinstance(request, Undecodable):
            await self._undecodable(record, request)
            return
        try:
            prepared = self._preparer.prepare(request, record.timestamp / 1000)
        except RequestError as exc:
            await self._reject(record, request.request_id, request.reply_topic, exc)
            return
        self._waiting.put(Job(prepared, tp, record.offset, self._preparer.reply_topic(request)))

    async def _undecodable(self, record: ConsumerRecord, failure: Undecodable) -> None:
        log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition,
                    record.offset, failure.reason)
        await self._publisher.dead_letter(record, failure.reason, failure.detail)
        if failure.envelope is not None:  # it names itself: tell its producer too
            error = RequestError("invalid_request", failure.detail)
            await self._reject(record, failure.envelope.request_id,
                               failure.envelope.reply_topic, error, dead_lettered=True)

    async def _reject(self, record: ConsumerRecord, request_id: str, reply_topic: str,
                      exc: RequestError, *, dead_lettered: bool = False) -> None:
        log.info("request %s rejected: %s: %s", request_id, exc.code, exc.message)
        topic = reply_topic or self._preparer.reply_topic_default
        if not self._preparer.reply_allowed(topic):
            # Never write where a job asks unless allowed: answer on the default topic,
            # and keep the original for inspection.
            topic = self._preparer.reply_topic_default
            if not dead_lettered:
                await self._publisher.dead_letter(record, exc.code, exc.message)
        tp = TopicPartition(record.topic, record.partition)
        await self._publisher.reject(topic, request_id, tp, record.offset, exc.code,
                                     exc.message)
