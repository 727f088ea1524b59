"""Publishing each request's stream to its reply topic, in ``seq`` order.

Messages are keyed by request id, so one request's stream lands in one
partition and the idempotent producer keeps it in order. The partition is
picked once per stream (with the producer's own key hash, as any Kafka client
would pick it) rather than hashed again for every chunk. The send of every
message is queued without waiting; only the terminal message's acknowledgement
is awaited (in the background) before its offset is marked done.

Coalescing: a stream's new tokens are held and merged into its next chunk

* while its previous chunk is still unacknowledged: when the engine outruns
  Kafka, chunks grow by themselves;
* while its previous chunk went out less than a pacing interval ago: every chunk
  costs the worker's interpreter (encoding, the producer's bookkeeping), the
  broker and every reader about as much as its tokens do, so under load the
  worker spends a budget of chunks per second across its streams. The interval
  is the streams' count over that budget — a few milliseconds when few streams
  run — and never more than half the inter-token target.

A stream's first chunk never waits, and a held token waits at most for that
acknowledgement or interval plus one engine step.

A stream's first message goes out only once its record's attempts mark is on the broker
(``before_first``): whoever takes the record over must know it was started. A stream
resumed from another attempt (:mod:`streamproc.ingest.resume`) continues its ``seq`` and
offsets. Every send first checks that this worker may still publish (``check_alive``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import msgspec
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord, RecordMetadata

from streamproc import wire
from streamproc.channel import Job
from streamproc.engine.sequence import Outcome, TokenEvent
from streamproc.errors import RequestError
from streamproc.flow.ledger import Ticket
from streamproc.logs import record_context
from streamproc.metrics.stats import WorkerStats
from streamproc.openai.replies import ANSWERED, OpenAIStream

log = logging.getLogger(__name__)
OnAcked = Callable[[Ticket], None]
OnFailed = Callable[[Ticket, BaseException], None]
BeforeFirst = Callable[[Ticket], Awaitable[None]]
StreamKey = tuple[TopicPartition, int, str]


@dataclass
class _Stream:
    """What the publisher tracks for one job's stream until its terminal message."""

    partition: int
    next_seq: int = 0
    held_text: str = ""
    held_tokens: list[int] = field(default_factory=list)
    held_logprobs: list[wire.TokenLogprob] | None = None
    in_flight: asyncio.Future[object] | None = None
    """The send of the stream's last chunk."""
    tokens_sent: int = 0
    text_sent: int = 0
    sent_at: float = -math.inf
    """When its last chunk went out (monotonic seconds)."""
    openai: OpenAIStream | None = None
    """Renders a job that came as an OpenAI Batch line; None: native messages."""

    @property
    def awaiting_ack(self) -> bool:
        return self.in_flight is not None and not self.in_flight.done()

    def take_seq(self) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq

    def take_held(self, text: str, tokens: list[int], logprobs: list[wire.TokenLogprob] | None
                  ) -> tuple[str, list[int], list[wire.TokenLogprob] | None]:
        if not self.holding:  # the common case, once per token: no copies
            return text, tokens, logprobs
        held = self.held_logprobs
        merged = (self.held_text + text, self.held_tokens + tokens,
                  None if held is None and logprobs is None else (held or []) + (logprobs or []))
        self.held_text, self.held_tokens, self.held_logprobs = "", [], None
        return merged

    @property
    def holding(self) -> bool:
        return bool(self.held_text or self.held_tokens)


@dataclass(frozen=True)
class ChunkPacing:
    """How far apart one stream's chunks go out, from a budget of chunks per second."""

    chunks_per_s: float = 0.0
    """The budget over all streams; 0: no pacing (acknowledgements alone decide)."""
    max_interval_s: float = 0.0
    """The longest a stream's tokens are held, whatever the budget."""

    def interval_s(self, streams: int) -> float:
        if self.chunks_per_s <= 0:
            return 0.0
        return min(streams / self.chunks_per_s, self.max_interval_s)


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, dead_letter_topic: str,
                 on_acked: OnAcked, on_failed: OnFailed, *, coalesce: bool = True,
                 pacing: ChunkPacing = ChunkPacing(),
                 stats: WorkerStats | None = None,
                 before_first: BeforeFirst | None = None,
                 check_alive: Callable[[], None] = lambda: None) -> None:
        """``coalesce``: merge a stream's tokens while its previous chunk is unacknowledged
        or went out less than ``pacing``'s interval ago (False: one chunk per step,
        whatever Kafka's pace)."""
        self._producer = producer
        self._dead_letter_topic = dead_letter_topic
        self._on_acked = on_acked
        self._on_failed = on_failed
        self._coalesce = coalesce
        self._pacing = pacing
        self._stats = stats or WorkerStats()
        self._streams: dict[StreamKey, _Stream] = {}
        self._partitioner = DefaultPartitioner()
        self._acks: set[asyncio.Task[None]] = set()
        self._before_first = before_first
        self._check_alive = check_alive
        """Raises when this worker must not publish any more (it may have lost its
        partitions: :mod:`streamproc.worker.liveness`)."""

    @property
    def chunk_interval_s(self) -> float:
        """The pacing interval for the streams open now."""
        return self._pacing.interval_s(len(self._streams))

    async def publish(self, job: Job, event: TokenEvent) -> None:
        """Send what ``event`` adds to ``job``'s stream."""
        stream = self._streams.get(_key(job)) or await self._open_stream(job)
        ending = event.outcome is not None
        if event.token_ids or event.text or (ending and stream.holding):
            await self._chunk(job, stream, event.text, event.token_ids, event.logprobs,
                              final=ending)
        if event.outcome is not None:
            o = event.outcome
            if stream.openai is not None and o.finish_reason in ANSWERED:
                await self._closing_chunks(job, stream, stream.openai, o)
            final = wire.FinalMessage(job.request_id, stream.take_seq(), o.finish_reason,
                                      o.usage, o.timings, o.detail, job.attempt)
            await self._finish(job, stream, final)

    async def fail(self, job: Job, code: str, message: str, retriable: bool = False) -> None:
        """End ``job``'s stream with an error message."""
        stream = self._streams.get(_key(job)) or await self._open_stream(job)
        if stream.holding:  # what was generated goes out before the end
            await self._chunk(job, stream, "", [], None, final=True)
        await self._finish(job, stream, wire.ErrorMessage(
            job.request_id, stream.take_seq(), code, message, retriable, job.attempt))

    async def reject(self, reply_topic: str, envelope: wire.RequestEnvelope, ticket: Ticket,
                     error: RequestError, attempt: str = "") -> None:
        """Answer a request that never became a job (it failed validation)."""
        request_id = envelope.request_id
        message = wire.ErrorMessage(request_id, 0, error.code, error.message, error.retriable,
                                    attempt, error.param)
        payload = (wire.encode(message) if envelope.openai is None
                   else OpenAIStream(envelope.openai, int(time.time())).error(message))
        ack = await self._send(reply_topic, request_id, payload)
        self._track(ack, ticket)

    async def dead_letter(self, record: ConsumerRecord, reason: str, detail: str,
                          ticket: Ticket) -> None:
        letter = wire.DeadLetter(reason=reason, detail=detail, topic=record.topic,
                                 partition=record.partition, offset=record.offset,
                                 original=record.value or b"", key=record.key)
        ack = await self._producer.send(self._dead_letter_topic, wire.encode(letter),
                                        key=record.key)
        self._track(ack, ticket)

    async def flush(self) -> None:
        """Wait until every queued message is acknowledged (or failed)."""
        await self._producer.flush()
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)

    def forget(self, job: Job) -> None:
        """``job`` was abandoned (its partition moved): drop its stream state."""
        self._streams.pop(_key(job), None)

    async def takeover(self, reply_topic: str, request_id: str,
                       attempt: str) -> tuple[TopicPartition, int]:
        """Publish that ``attempt`` takes ``request_id``'s stream over; once acknowledged,
        return where it landed: readers ignore every other attempt after that offset."""
        partition = await self._partition(reply_topic, request_id)
        ack = await self._send(reply_topic, request_id,
                               wire.encode(wire.Takeover(request_id, attempt)), partition)
        metadata = cast(RecordMetadata, await ack)
        return TopicPartition(reply_topic, partition), metadata.offset

    async def _open_stream(self, job: Job) -> _Stream:
        """State for ``job``'s first message; later ones find it with a plain dict lookup
        at the call, so publishing an event costs no extra coroutine."""
        if self._before_first is not None:
            began = time.monotonic()
            await self._before_first(job.ticket)
            self._stats.mark_wait_seconds += time.monotonic() - began
        self._stats.streams_opened += 1
        stream = _Stream(await self._partition(job.reply_topic, job.request_id))
        resumed = job.prepared.resumed
        if resumed is not None:
            stream.next_seq = resumed.next_seq
            stream.tokens_sent, stream.text_sent = len(resumed.tokens), len(resumed.text)
        reply = job.prepared.request.openai
        if reply is not None:
            stream.openai = OpenAIStream(
                reply, int(job.prepared.origin_ts), resumed.text if resumed else "",
                resumed.logprobs if resumed else None, stream.next_seq)
        self._streams[_key(job)] = stream
        return stream

    async def _partition(self, topic: str, request_id: str) -> int:
        partitions = sorted(await self._producer.partitions_for(topic))
        return int(self._partitioner(request_id.encode(), partitions, partitions))

    async def _chunk(self, job: Job, stream: _Stream, text: str, tokens: list[int],
                     logprobs: list[wire.TokenLogprob] | None, *, final: bool) -> None:
        text, tokens, logprobs = stream.take_held(text, tokens, logprobs)
        now = time.monotonic()
        if self._coalesce and not final and self._hold(stream, now):
            stream.held_text, stream.held_tokens, stream.held_logprobs = text, tokens, logprobs
            return
        chunk = wire.TokenChunk(job.request_id, stream.take_seq(), text, tokens, job.attempt,
                                stream.tokens_sent, stream.text_sent,
                                msgspec.UNSET if logprobs is None else logprobs)
        stream.tokens_sent += len(tokens)
        stream.text_sent += len(text)
        stream.sent_at = now
        self._stats.chunks_published += 1
        self._stats.chunk_tokens_published += len(tokens)
        payload = wire.encode(chunk) if stream.openai is None else stream.openai.chunk(chunk)
        stream.in_flight = await self._send(job.reply_topic, job.request_id, payload,
                                            stream.partition)

    async def _closing_chunks(self, job: Job, stream: _Stream, openai: OpenAIStream,
                              outcome: Outcome) -> None:
        """OpenAI's last chunk (the finish reason) and, if asked for, its usage chunk."""
        def empty() -> wire.TokenChunk:
            return wire.TokenChunk(job.request_id, stream.take_seq(), "", [], job.attempt,
                                   stream.tokens_sent, stream.text_sent)
        payloads = [openai.finish_chunk(empty(), outcome.finish_reason)]
        if openai.include_usage:
            payloads.append(openai.usage_chunk(empty(), outcome.usage))
        for payload in payloads:
            await self._send(job.reply_topic, job.request_id, payload, stream.partition)

    def _hold(self, stream: _Stream, now: float) -> bool:
        """Whether ``stream``'s new tokens wait for its next chunk: Kafka is behind it, or
        its last chunk went out within the pacing interval."""
        return stream.awaiting_ack or now - stream.sent_at < self.chunk_interval_s

    async def _finish(self, job: Job, stream: _Stream,
                      final: wire.FinalMessage | wire.ErrorMessage) -> None:
        self._streams.pop(_key(job), None)
        ack = await self._send(job.reply_topic, job.request_id,
                               _terminal(final, stream.openai), stream.partition)
        self._track(ack, job.ticket)

    async def _send(self, topic: str, request_id: str, payload: bytes,
                    partition: int | None = None) -> asyncio.Future[object]:
        self._check_alive()
        future: asyncio.Future[object] = await self._producer.send(
            topic, payload, key=request_id.encode(), partition=partition)
        return future

    def _track(self, ack: asyncio.Future[object], ticket: Ticket) -> None:
        task = asyncio.ensure_future(self._await_ack(ack, ticket))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _await_ack(self, ack: asyncio.Future[object], ticket: Ticket) -> None:
        try:
            await ack
        except Exception as exc:
            # The producer retried until its delivery timeout: the broker would not take
            # it. Never silent: the record's watermark would stop there for good.
            log.error("publish failed for %s[%d]@%d: %r", ticket.tp.topic,
                      ticket.tp.partition, ticket.offset, exc,
                      extra=record_context(ticket.tp.topic, ticket.tp.partition,
                                           ticket.offset))
            self._on_failed(ticket, exc)
            return
        self._on_acked(ticket)


def _terminal(message: wire.FinalMessage | wire.ErrorMessage,
              openai: OpenAIStream | None) -> bytes:
    if openai is None:
        return wire.encode(message)
    if isinstance(message, wire.FinalMessage):
        return openai.final(message)
    return openai.error(message)


def _key(job: Job) -> StreamKey:
    # By record, not request id (two jobs may reuse an id), and by attempt: a record read
    # again after a rebalance starts a new stream even if an old one was never cleared.
    return (*job.key, job.attempt)
