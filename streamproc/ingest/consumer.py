"""The fetch loop: read request records, route each one, and stop reading when full.

Every record ends up exactly one of: a job in the waiting queue, an error
response on its reply topic, or a dead letter. A record another attempt started is
taken over first (:mod:`streamproc.ingest.resume`): it continues that stream.
Fetching pauses (without leaving
the group: the loop keeps polling) once the worker holds ``max_inflight``
records and resumes below the low-water mark.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streamproc import wire
from streamproc.channel import Job, WaitingQueue
from streamproc.engine.sequence import PreparedRequest, Resumed, unserved_event
from streamproc.errors import RequestError
from streamproc.flow.ledger import Ledger, Ticket
from streamproc.flow.priority import lanes_to_pause
from streamproc.flow.recent import RecentRequests
from streamproc.flow.shedding import cannot_meet_deadline
from streamproc.ingest.attempts import AttemptLog
from streamproc.ingest.control import CancelledIds
from streamproc.ingest.decode import Refused, Undecodable, decode_request, envelope_of
from streamproc.ingest.prepare import Preparer
from streamproc.ingest.resume import Claim, Resumer
from streamproc.logs import record_context
from streamproc.metrics.stats import WorkerStats
from streamproc.publish.publisher import Publisher
from streamproc.wire import FinishReason, GenerationRequest

log = logging.getLogger(__name__)
POLL_TIMEOUT_MS = 200


class Ingest:
    def __init__(self, consumer: AIOKafkaConsumer, preparer: Preparer, waiting: WaitingQueue,
                 ledger: Ledger, publisher: Publisher,
                 stats: WorkerStats, *, lanes: tuple[str, ...], lane_backlog: int,
                 cancelled: CancelledIds, max_message_bytes: int,
                 attempts: AttemptLog, poison_attempts: int, resumer: Resumer) -> None:
        self._consumer = consumer
        self._preparer = preparer
        self._waiting = waiting
        self._ledger = ledger
        self._publisher = publisher
        self._stats = stats
        self._max_bytes = max_message_bytes
        self._lanes = lanes
        self._lane_backlog = lane_backlog
        self._cancelled = cancelled
        self._attempts, self._poison_attempts = attempts, poison_attempts
        self._resumer = resumer
        self._recent = RecentRequests()
        self.paused = False
        self.paused_partitions = 0
        """Read by the metrics thread: a plain int, updated on the event loop."""

    def unread(self) -> int:
        """Records on this worker's partitions that it has not read yet, as of its last
        fetches (each response carries the partition's high watermark): its own lag,
        fresh at every fetch, where the group's is sampled every few seconds."""
        total = 0
        for tp in self._consumer.assignment():
            highwater, read = self._consumer.highwater(tp), self._ledger.next_offset(tp)
            if highwater is not None and read is not None:
                total += max(0, highwater - read)
        return total

    async def run(self) -> None:
        """Fetch until cancelled."""
        while True:
            self._apply_gate()
            fetched = await self._fetch(self._ledger.room())
            started: list[tuple[Job, float]] = []
            for tp, records in fetched.items():
                for record in records:
                    job = await self._job(record, self._ledger.read(tp, record.offset))
                    since = None if job is None else self._attempts.started(job.ticket)
                    if since is not None and job is not None:
                        started.append((job, since))
                    elif job is not None:
                        await self._serve(job)
            if started:
                for claim in await self._resumer.take_over(started):
                    await self._resume(claim)

    async def _fetch(self, room: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Up to ``room`` records, taken lane by lane, highest first.

        A plain ``getmany`` drains its buffer partition by partition, so a full
        buffer of a low lane could starve a higher one. Buffered records are taken
        lane by lane without waiting; when there are none, one record is awaited
        (from any lane) and the rest of the room is again filled lane by lane.
        """
        fetched = await self._by_lane(room)
        if fetched or room <= 0:
            return fetched
        first = dict(await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=1))
        if not first:
            return first
        for tp, records in (await self._by_lane(room - 1)).items():
            first[tp] = first.get(tp, []) + records
        return first

    async def _by_lane(self, room: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        fetched: dict[TopicPartition, list[ConsumerRecord]] = {}
        assigned = self._consumer.assignment()
        for lane in self._lanes:
            left = room - sum(len(r) for r in fetched.values())
            partitions = [tp for tp in assigned if tp.topic == lane]
            if left <= 0 or not partitions:
                continue
            fetched.update(await self._consumer.getmany(*partitions, timeout_ms=0,
                                                        max_records=left))
        return fetched

    def _apply_gate(self) -> None:
        """Pause everything when full; else pause lanes below one with a backlog."""
        gate = self._ledger.gate(self.paused)
        if gate != "hold":
            self.paused = gate == "pause"
        assigned = self._consumer.assignment()
        if self.paused:
            wanted = set(assigned)
        else:
            ranks = lanes_to_pause(self._waiting.by_rank(), self._lane_backlog)
            lanes = {self._lanes[rank] for rank in ranks}
            wanted = {tp for tp in assigned if tp.topic in lanes}
        # Compared with what is paused now: a rebalance hands partitions over unpaused.
        current = self._consumer.paused()
        if wanted - current:
            self._consumer.pause(*(wanted - current))
        if current - wanted:
            self._consumer.resume(*(current - wanted))
        self.paused_partitions = len(wanted)

    async def _resume(self, claim: Claim) -> None:
        """Serve a taken-over job from where its readers' stream stands."""
        follower, job = claim.follower, claim.job
        if follower.end is not None:  # its stream had ended: nothing more to say
            if self._ledger.done(job.ticket):
                self._attempts.done(job.ticket)
            return
        resumed = Resumed(follower.tokens, follower.joined_text, follower.next_seq,
                          follower.logprobs)
        job = replace(job, prepared=job.prepared.resume(resumed))
        if job.prepared.max_new_tokens <= 0:  # it had all its tokens but not its end
            await self._answer(job, "length")
            return
        await self._serve(job)

    async def _serve(self, job: Job) -> None:
        if await self._answered_at_once(job):
            return
        prepared = job.prepared
        self._ledger.cost(job.ticket, len(prepared.prompt_ids) + prepared.max_new_tokens,
                          prepared.max_new_tokens)
        self._waiting.put(job, self._lanes.index(job.tp.topic))

    async def _job(self, record: ConsumerRecord, ticket: Ticket) -> Job | None:
        """The record as a job to serve; None when it was dead-lettered, answered with an
        error, or is a duplicate."""
        deaths = self._attempts.count(ticket)
        if deaths >= self._poison_attempts:
            await self._poison(record, ticket, deaths)
            return None
        request = decode_request(record.value, self._max_bytes)
        if isinstance(request, Undecodable):
            await self._undecodable(record, ticket, request)
            return None
        if isinstance(request, Refused):
            await self._reject(record, ticket, request.envelope, request.error)
            return None
        first = self._recent.duplicate_of(ticket.tp, request.request_id, record.offset,
                                          request.submitted_at)
        if first is not None:
            self._duplicate(record, ticket, request.request_id, first)
            return None
        try:
            prepared = self._preparer.prepare(request, record.timestamp / 1000)
        except RequestError as exc:
            await self._reject(record, ticket, _envelope(request), exc)
            return None
        except Exception as exc:  # a tokenizer or template failing on this one
            await self._unprocessable(record, ticket, request, exc)
            return None
        self._stats.kafka_wait.observe(max(0.0, time.time() - prepared.origin_ts))
        return Job(prepared, ticket, self._preparer.reply_topic(request), deaths=deaths,
                   alone=deaths >= max(1, self._poison_attempts - 1))

    async def _answered_at_once(self, job: Job) -> bool:
        """Cancelled before it was read, or unable to meet its deadline: ended without
        compute."""
        if job.request_id in self._cancelled:
            await self._answer(job, "cancelled")
            return True
        if self._overloaded_for(job.prepared):
            await self._answer(job, "rejected", "overloaded")
            return True
        return False

    async def _answer(self, job: Job, reason: FinishReason, detail: str = "") -> None:
        """End ``job`` at once, without compute."""
        event = unserved_event(job.prepared, time.time(), reason, detail)
        assert event.outcome is not None
        self._stats.finished(event.outcome)
        await self._publisher.publish(job, event)

    def _overloaded_for(self, prepared: PreparedRequest) -> bool:
        return cannot_meet_deadline(time.time(), prepared.request.deadline, self._ledger.work,
                                    prepared.max_new_tokens, self._stats.rate.tokens_per_s)

    async def _undecodable(self, record: ConsumerRecord, ticket: Ticket,
                           failure: Undecodable) -> None:
        log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition,
                    record.offset, failure.reason,
                    extra={**record_context(record.topic, record.partition, record.offset),
                           "code": failure.reason})
        await self._publisher.dead_letter(record, failure.reason, failure.detail, ticket)
        if failure.envelope is None:
            self._stats.failed("dead_letter")
        else:  # it names itself: tell its producer too
            error = RequestError("invalid_request", failure.detail, param=failure.param)
            await self._reject(record, ticket, failure.envelope, error, dead_lettered=True)

    def _duplicate(self, record: ConsumerRecord, ticket: Ticket, request_id: str,
                   first: int) -> None:
        """The same job again (a producer's retry): its stream is the first record's."""
        log.info("request %s at offset %d duplicates offset %d; not served twice", request_id,
                 record.offset, first,
                 extra={**record_context(record.topic, record.partition, record.offset,
                                         request_id), "code": "duplicate"})
        self._stats.duplicates += 1
        self._ledger.done(ticket)

    async def _poison(self, record: ConsumerRecord, ticket: Ticket, deaths: int) -> None:
        """A record its workers kept dying on: kept for inspection, its producer told, and
        the group goes on past it."""
        detail = (f"the worker died each of the last {deaths} times this request ran in "
                  "its engine; it is not served again")
        log.error("dead letter from %s[%d]@%d: poison: %s", record.topic, record.partition,
                  record.offset, detail,
                  extra={**record_context(record.topic, record.partition, record.offset),
                         "code": "poison"})
        await self._publisher.dead_letter(record, "poison", detail, ticket)
        envelope = envelope_of(record.value)
        if envelope is None:
            self._stats.failed("poison")
            return
        await self._reject(record, ticket, envelope,
                           RequestError("poison", detail), dead_lettered=True)

    async def _unprocessable(self, record: ConsumerRecord, ticket: Ticket,
                             request: GenerationRequest, exc: Exception) -> None:
        """A request that decoded but whose preparation raised what no rule foresaw: kept
        in the dead-letter topic for inspection, its producer told, the worker going on."""
        detail = f"could not be prepared: {type(exc).__name__}: {exc}"
        log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition,
                    record.offset, detail, exc_info=exc,
                    extra={**record_context(record.topic, record.partition, record.offset,
                                            request.request_id), "code": "unprocessable"})
        await self._publisher.dead_letter(record, "unprocessable", detail, ticket)
        await self._reject(record, ticket, _envelope(request),
                           RequestError("invalid_request", detail), dead_lettered=True)

    async def _reject(self, record: ConsumerRecord, ticket: Ticket,
                      envelope: wire.RequestEnvelope, exc: RequestError, *,
                      dead_lettered: bool = False) -> None:
        request_id, reply_topic = envelope.request_id, envelope.reply_topic
        log.info("request %s rejected: %s: %s", request_id, exc.code, exc.message,
                 extra={**record_context(record.topic, record.partition, record.offset,
                                         request_id), "code": exc.code})
        self._stats.failed(exc.code)
        topic = self._answer_topic(reply_topic)
        if topic != (reply_topic or self._preparer.reply_topic_default) and not dead_lettered:
            await self._publisher.dead_letter(record, exc.code, exc.message, ticket)
        attempt = ""
        if self._attempts.started(ticket) is not None:
            # Started elsewhere (a poison record; settings changed between two workers):
            # its readers follow an attempt, so the error comes as a takeover's.
            attempt = uuid.uuid4().hex[:12]
            await self._publisher.takeover(topic, request_id, attempt)
        await self._publisher.reject(topic, envelope, ticket, exc, attempt)

    def _answer_topic(self, reply_topic: str) -> str:
        """Where to answer a job that names ``reply_topic``: never where a job asks unless
        allowed (then the default topic; the original is kept for inspection)."""
        topic = reply_topic or self._preparer.reply_topic_default
        return topic if self._preparer.reply_allowed(topic) else \
            self._preparer.reply_topic_default


def _envelope(request: GenerationRequest) -> wire.RequestEnvelope:
    return wire.RequestEnvelope(request.request_id, request.reply_topic, request.openai)
