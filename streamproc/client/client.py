"""Submit prompt jobs and read their streams back, in order, once each.

The client reads its reply topic from the end (positions fixed before the
first submit, so nothing is missed), routes messages by request id and applies
the reader rule (:mod:`streamproc.follow`): one attempt's messages at a time,
switching only at a takeover, ending at the first terminal message.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import pairwise
from types import TracebackType

import msgspec
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from streamproc import kafka, wire
from streamproc.client.admission import AdmissionGate
from streamproc.config import DEFAULT_LANE, KafkaSecurity, TopicNames
from streamproc.errors import GenerationError, TopicMissingError
from streamproc.flow.admission import AdmissionPolicy
from streamproc.follow import Follower, Kept

log = logging.getLogger(__name__)
_DEFAULTS = TopicNames()


@dataclass
class Result:
    """A finished request, with latencies measured on the client's clock too."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: wire.Usage
    timings: wire.Timings
    client_ttft_s: float
    client_total_s: float
    inter_token_s: list[float] = field(default_factory=list)


class ResultStream:
    """One request's stream: ``async for chunk in stream`` or ``await stream.result()``."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.submitted_at = time.time()
        self._inbox: asyncio.Queue[Kept] = asyncio.Queue()
        self._follower = Follower(request_id)
        self._text: list[str] = []
        self._tokens: list[int] = []
        self._arrivals: list[float] = []
        self._result: Result | None = None

    @property
    def next_seq(self) -> int:
        return self._follower.next_seq

    def deliver(self, message: wire.ResponseMessage) -> bool:
        """Accept ``message`` if the reader rule keeps it; False when it adds nothing (a
        takeover, another attempt's message, anything after the end)."""
        kept = self._follower.take(message)
        if kept is None:
            return False
        self._inbox.put_nowait(kept)
        return True

    def __aiter__(self) -> AsyncIterator[wire.TokenChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[wire.TokenChunk]:
        while self._result is None:
            message = await self._inbox.get()
            if isinstance(message, wire.TokenChunk):
                self._record(message)
                yield message
            else:
                self._finish(message)

    async def result(self) -> Result:
        """Wait for the end of the stream; raises :class:`GenerationError` on error."""
        async for _ in self:
            pass
        if self._result is None:
            raise RuntimeError("stream ended without a result")
        return self._result

    def _record(self, chunk: wire.TokenChunk) -> None:
        self._arrivals.append(time.time())
        self._text.append(chunk.text)
        self._tokens.extend(chunk.token_ids)

    def _finish(self, message: wire.ResponseMessage) -> None:
        if isinstance(message, wire.ErrorMessage):
            raise GenerationError(self.request_id, message.code, message.message,
                                   message.retriable)
        assert isinstance(message, wire.FinalMessage)
        now = time.time()
        first = self._arrivals[0] if self._arrivals else now
        self._result = Result(
            request_id=self.request_id, text="".join(self._text), token_ids=self._tokens,
            finish_reason=message.finish_reason, usage=message.usage, timings=message.timings,
            client_ttft_s=first - self.submitted_at, client_total_s=now - self.submitted_at,
            inter_token_s=[b - a for a, b in pairwise(self._arrivals)],
        )


class StreamprocClient:
    """``async with StreamprocClient(bootstrap) as client: stream = await client.submit(...)``"""

    def __init__(self, bootstrap: str, *, request_topic: str = DEFAULT_LANE,
                 reply_topic: str = _DEFAULTS.responses,
                 admission: AdmissionPolicy | None = None,
                 group_id: str = "streamproc-workers",
                 status_topic: str = _DEFAULTS.status,
                 control_topic: str = _DEFAULTS.control,
                 security: KafkaSecurity | None = None,
                 close_timeout_s: float = kafka.CLOSE_TIMEOUT_S) -> None:
        """``admission``: check the lane's lag before each submit (None: never check).
        ``group_id`` and ``status_topic`` say whose lag and throughput to look at.
        ``security``: SASL/TLS settings (default plaintext); see ``KafkaSecurity``.
        ``close_timeout_s``: how long :meth:`stop` may wait for an unreachable broker."""
        self.request_topic = request_topic
        self._close_timeout_s = close_timeout_s
        self.reply_topic = reply_topic
        self.control_topic = control_topic
        self._gate = None if admission is None else AdmissionGate(
            bootstrap, group_id, request_topic, status_topic, admission, security=security)
        self._producer = kafka.producer(bootstrap, security)
        self._consumer = kafka.consumer(bootstrap, security=security, group_id=None)
        self._streams: dict[str, ResultStream] = {}
        self._lanes_seen: set[str] = set()
        """Request topics known to exist (checked once each)."""
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StreamprocClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect; raises (having closed what it opened) when the broker cannot be
        reached or the reply topic does not exist."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._partitions(self.reply_topic)
        if not partitions:
            raise TopicMissingError(f"the reply topic {self.reply_topic!r} does not exist")
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so no reply can slip past
            await self._consumer.position(tp)
        if self._gate is not None:
            await self._gate.start()
        self._reader = asyncio.create_task(self._read(), name="streamproc-client-reader")

    async def _partitions(self, topic: str) -> set[int]:
        """``topic``'s partitions, none if it does not exist, from fresh metadata of the
        whole cluster (asking for one topic would wait for it to appear)."""
        try:
            cluster = await self._producer.client.fetch_all_metadata()
        except KafkaError:
            return set()
        return set(cluster.partitions_for_topic(topic) or ())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        deadline = time.monotonic() + self._close_timeout_s
        await kafka.close_within("closing the client's producer", self._producer.stop(),
                                 deadline - time.monotonic())
        await kafka.close_within("closing the client's consumer", self._consumer.stop(),
                                 deadline - time.monotonic())
        if self._gate is not None:
            await kafka.close_within("closing the client's lag reader", self._gate.stop(),
                                     deadline - time.monotonic())

    async def submit(self, prompt: str | list[wire.ChatMessage], *,
                     params: wire.GenerationParams | None = None, priority: int = 0,
                     deadline: float | None = None, request_id: str | None = None,
                     lane: str | None = None) -> ResultStream:
        """Publish one job to ``lane`` (default: the client's request topic); returns its
        stream at once (tokens follow as generated).

        With an admission policy this may first wait, or raise
        :class:`~streamproc.errors.OverloadedError`. A job the broker does not accept
        fails its stream with code ``publish_failed``; a lane that does not exist raises
        :class:`~streamproc.errors.TopicMissingError` (rather than waiting for it to).
        """
        topic = lane or self.request_topic
        if topic not in self._lanes_seen:
            if not await self._partitions(topic):
                raise TopicMissingError(f"the request topic {topic!r} does not exist")
            self._lanes_seen.add(topic)
        if self._gate is not None:
            await self._gate.admit(priority)
        rid = request_id or uuid.uuid4().hex
        stream = ResultStream(rid)
        self._streams[rid] = stream
        request = wire.GenerationRequest(
            request_id=rid, prompt=prompt, params=params or wire.GenerationParams(),
            priority=priority, deadline=deadline, reply_topic=self.reply_topic,
            submitted_at=stream.submitted_at)
        delivery = await self._producer.send(topic, wire.encode(request), key=rid.encode())
        delivery.add_done_callback(lambda done: self._delivered(stream, done))
        return stream

    def _delivered(self, stream: ResultStream, delivery: asyncio.Future[object]) -> None:
        if delivery.cancelled() or delivery.exception() is None:
            return
        self._streams.pop(stream.request_id, None)
        stream.deliver(wire.ErrorMessage(stream.request_id, stream.next_seq, "publish_failed",
                                         str(delivery.exception()), retriable=True))

    async def cancel(self, request_id: str) -> None:
        """Ask every worker to stop ``request_id``: it ends with a final ``cancelled``
        (at the next step if running, at once if waiting or not yet read)."""
        await self._producer.send_and_wait(self.control_topic,
                                           wire.encode(wire.CancelRequest(request_id)),
                                           key=request_id.encode())

    async def generate(self, prompt: str | list[wire.ChatMessage], *,
                       params: wire.GenerationParams | None = None, priority: int = 0,
                       deadline: float | None = None,
                       request_id: str | None = None) -> Result:
        """Submit and wait for the whole result."""
        stream = await self.submit(prompt, params=params, priority=priority, deadline=deadline,
                                   request_id=request_id)
        return await stream.result()

    async def _read(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=500)
            for records in fetched.values():
                for record in records:
                    self._route(record.value)

    def _route(self, value: bytes | None) -> None:
        try:
            message = wire.response_decoder.decode(value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):  # not ours: skip
            return
        stream = self._streams.get(message.request_id)
        if stream is not None and stream.deliver(message) and wire.is_terminal(message):
            del self._streams[message.request_id]
