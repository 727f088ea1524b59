"""The fetch loop: read request records, route each one, and stop reading when full.

Every record ends up exactly one of: a job in the waiting queue, an error
response on its reply topic, or a dead letter. Fetching pauses (without leaving
the group: the loop keeps polling) once the worker holds ``max_inflight``
records and resumes below the low-water mark.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streamproc.channel import Job, WaitingQueue
from streamproc.engine.sequence import PreparedRequest, unserved_event
from streamproc.errors import RequestError
from streamproc.flow.budget import InflightBudget
from streamproc.flow.checkpoint import Checkpoint
from streamproc.flow.shedding import cannot_meet_deadline
from streamproc.ingest.decode import Undecodable, decode_request
from streamproc.ingest.prepare import Preparer
from streamproc.logs import record_context
from streamproc.metrics.stats import WorkerStats
from streamproc.publish.publisher import Publisher

log = logging.getLogger(__name__)
POLL_TIMEOUT_MS = 200


class Ingest:
    def __init__(self, consumer: AIOKafkaConsumer, preparer: Preparer, waiting: WaitingQueue,
                 checkpoint: Checkpoint, budget: InflightBudget, publisher: Publisher,
                 stats: WorkerStats, *, max_message_bytes: int) -> None:
        self._consumer = consumer
        self._preparer = preparer
        self._waiting = waiting
        self._checkpoint = checkpoint
        self._budget = budget
        self._publisher = publisher
        self._stats = stats
        self._max_bytes = max_message_bytes
        self.paused = False
        self.paused_partitions = 0
        """Read by the metrics thread: a plain int, updated on the event loop."""

    async def run(self) -> None:
        """Fetch until cancelled."""
        while True:
            self._apply_gate()
            fetched = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS,
                                                   max_records=self._budget.room())
            for tp, records in fetched.items():
                for record in records:
                    await self._route(tp, record)

    def _apply_gate(self) -> None:
        gate = self._budget.gate(self.paused)
        if gate == "pause":
            self.paused = True
        elif gate == "resume":
            self._consumer.resume(*self._consumer.assignment())
            self.paused = False
        if self.paused:
            # Also re-pauses partitions a rebalance assigned since: they start unpaused.
            self._consumer.pause(*self._consumer.assignment())
        self.paused_partitions = len(self._consumer.assignment()) if self.paused else 0

    async def _route(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self._checkpoint.track(tp, record.offset)
        self._budget.acquire((tp, record.offset))
        request = decode_request(record.value, self._max_bytes)
        if isinstance(request, Undecodable):
            await self._undecodable(record, request)
            return
        try:
            prepared = self._preparer.prepare(request, record.timestamp / 1000)
        except RequestError as exc:
            await self._reject(record, request.request_id, request.reply_topic, exc)
            return
        self._stats.kafka_wait.observe(max(0.0, time.time() - prepared.origin_ts))
        job = Job(prepared, tp, record.offset, self._preparer.reply_topic(request))
        if self._overloaded_for(prepared):
            event = unserved_event(prepared, time.time(), "rejected", "overloaded")
            assert event.outcome is not None
            self._stats.finished(event.outcome)
            await self._publisher.publish(job, event)
            return
        self._budget.acquire(job.key, len(prepared.prompt_ids) + prepared.max_new_tokens,
                             prepared.max_new_tokens)
        self._waiting.put(job)

    def _overloaded_for(self, prepared: PreparedRequest) -> bool:
        return cannot_meet_deadline(time.time(), prepared.request.deadline, self._budget.work,
                                    prepared.max_new_tokens, self._stats.rate.tokens_per_s)

    async def _undecodable(self, record: ConsumerRecord, failure: Undecodable) -> None:
        log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition,
                    record.offset, failure.reason,
                    extra={**record_context(record.topic, record.partition, record.offset),
                           "code": failure.reason})
        await self._publisher.dead_letter(record, failure.reason, failure.detail)
        if failure.envelope is None:
            self._stats.failed("dead_letter")
        else:  # it names itself: tell its producer too
            error = RequestError("invalid_request", failure.detail)
            await self._reject(record, failure.envelope.request_id,
                               failure.envelope.reply_topic, error, dead_lettered=True)

    async def _reject(self, record: ConsumerRecord, request_id: str, reply_topic: str,
                      exc: RequestError, *, dead_lettered: bool = False) -> None:
        log.info("request %s rejected: %s: %s", request_id, exc.code, exc.message,
                 extra={**record_context(record.topic, record.partition, record.offset,
                                         request_id), "code": exc.code})
        self._stats.failed(exc.code)
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
