"""``streamproc batch``: an OpenAI Batch input file through Kafka, answers to files.

Every line is published as it is to a request lane, keyed by its ``custom_id`` (its
``streamproc`` member gains the reply topic); the reply topic is read for each request's
last message, the Batch output line, which holds the whole answer. Answers go to the
output file (a completion) or the errors file (anything else), one line each, flushed as
they come, so a run stopped at any moment keeps every answer it wrote.

Run again with the same files, it picks up: lines answered in the files are not sent
again; lines an earlier run had published (the progress file says how many) are awaited,
not sent again, and their answers are read back from the reply topic from when the first
run began. A line sent twice by chance (a send whose acknowledgement was lost) is
answered once: the first answer read wins, the rest are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamproc import kafka, wire
from streamproc.config import KafkaSecurity
from streamproc.errors import TopicMissingError
from streamproc.openai import protocol, shapes
from streamproc.openai.batch_file import (
    BatchFileError,
    BatchIndex,
    Progress,
    mark_answered,
    numbered_lines,
    read_progress,
    scan,
    write_progress,
)

READ_BACK_SLACK_S = 10.0
"""A resumed run reads the reply topic from this long before the first run began."""
SAVE_EVERY_S = 1.0


@dataclass(frozen=True)
class BatchSettings:
    input: Path
    output: Path
    errors: Path
    lane: str
    reply_topic: str
    max_in_flight: int = 1000
    max_line_bytes: int = 1_000_000

    @property
    def progress_file(self) -> Path:
        return self.output.with_name(self.output.name + ".progress")


@dataclass
class Tally:
    """How far the batch is, for the progress line and the summary."""

    total: int
    done: int = 0
    """Lines answered, this run and earlier ones."""
    failed: int = 0
    """Of this run's answers, those in the errors file."""
    answered_now: int = 0
    tokens_now: int = 0
    """Completion tokens of this run's answers."""
    sent_now: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_now / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.answered_now:
            return None
        return (self.total - self.done) * self.elapsed_s / self.answered_now


class _Status(msgspec.Struct):
    status_code: int = 0


_status_decoder = msgspec.json.Decoder(_Status | None)
_output_encoder = msgspec.json.Encoder()


class BatchRun:
    def __init__(self, bootstrap: str, settings: BatchSettings,
                 security: KafkaSecurity | None = None,
                 on_progress: Callable[[Tally], None] = lambda tally: None) -> None:
        self._settings = settings
        self._on_progress = on_progress
        self._bootstrap, self._security = bootstrap, security
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._in_flight: set[int] = set()
        self._all_answered = asyncio.Event()
        self._index = BatchIndex.of([])
        self._progress = Progress("", settings.reply_topic, 0.0)
        self.tally = Tally(0)

    async def run(self) -> Tally:
        """Send what is left and wait for every answer; raises :class:`BatchFileError`
        before sending anything when the files cannot be run."""
        s = self._settings
        self._index = await asyncio.to_thread(scan, s.input, s.max_line_bytes)
        self._progress = self._resume_or_start()
        mark_answered(self._index, s.output, s.errors)
        self.tally = Tally(len(self._index), done=self._index.done)
        if self.tally.done == self.tally.total:
            s.progress_file.unlink(missing_ok=True)
            return self.tally
        try:
            await self._start()
            await self._serve()
        finally:
            write_progress(s.progress_file, self._progress)
            await self._stop()
        s.progress_file.unlink(missing_ok=True)
        return self.tally

    def _resume_or_start(self) -> Progress:
        s = self._settings
        source, size = str(s.input.resolve()), s.input.stat().st_size
        progress = read_progress(s.progress_file)
        if progress is None:
            return Progress(source, s.reply_topic, time.time(), size)
        if progress.input != source or progress.reply_topic != s.reply_topic:
            raise BatchFileError(
                f"{s.progress_file} belongs to a run of {progress.input} answered on "
                f"{progress.reply_topic}: name another --output, or remove it to start over")
        if progress.input_bytes != size:
            raise BatchFileError(
                f"{s.input} changed since the run {s.progress_file} records began: name "
                "another --output, or remove the progress file to start over")
        return progress

    async def _start(self) -> None:
        # Made here, not in __init__: aiokafka's clients belong to the running loop.
        self._producer = kafka.producer(self._bootstrap, self._security)
        self._consumer = kafka.consumer(self._bootstrap, security=self._security,
                                        group_id=None)
        await self._producer.start()
        await self._consumer.start()
        for topic in (self._settings.lane, self._settings.reply_topic):
            if not await self._partitions(topic):
                raise TopicMissingError(f"the topic {topic!r} does not exist")
        tps = [TopicPartition(self._settings.reply_topic, p)
               for p in sorted(await self._partitions(self._settings.reply_topic))]
        self._consumer.assign(tps)
        await self._seek(tps)
        write_progress(self._settings.progress_file, self._progress)

    async def _partitions(self, topic: str) -> set[int]:
        cluster = await self._producer.client.fetch_all_metadata()
        return set(cluster.partitions_for_topic(topic) or ())

    async def _seek(self, tps: list[TopicPartition]) -> None:
        """Where answers may already be: from just before the first run began (a fresh
        run: the end, fixed before anything is sent)."""
        since = int((self._progress.started_at - READ_BACK_SLACK_S) * 1000)
        found = await self._consumer.offsets_for_times({tp: since for tp in tps})
        ends = await self._consumer.end_offsets(tps)
        for tp in tps:
            at = found.get(tp)
            self._consumer.seek(tp, at.offset if at is not None else ends[tp])
            await self._consumer.position(tp)

    async def _stop(self) -> None:
        if not hasattr(self, "_producer"):
            return
        await kafka.close_within("closing the batch's producer", self._producer.stop(),
                                 kafka.CLOSE_TIMEOUT_S)
        await kafka.close_within("closing the batch's consumer", self._consumer.stop(),
                                 kafka.CLOSE_TIMEOUT_S)

    async def _serve(self) -> None:
        s = self._settings
        with s.output.open("ab") as output, s.errors.open("ab") as errors:
            reader = asyncio.create_task(_Reader(self, output, errors).run())
            sender = asyncio.create_task(self._send_all())
            ticker = asyncio.create_task(self._tick())
            try:
                done, _ = await asyncio.wait({reader, sender},
                                             return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a send the broker refused, a topic gone: raise it
                await reader
            finally:
                for task in (reader, sender, ticker):
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                self._on_progress(self.tally)

    async def _send_all(self) -> None:
        pending: deque[tuple[int, asyncio.Future[object] | None]] = deque()
        for i, (_, line) in enumerate(numbered_lines(self._settings.input)):
            custom_id = protocol.line_envelope_decoder.decode(line).custom_id
            slot = self._index.slot(custom_id)
            assert slot is not None  # the scan indexed every line
            if self._index.answered[slot] or i < self._progress.sent:
                pending.append((i, None))
            else:
                await self._slots.acquire()
                if self._index.answered[slot]:  # its answer came while this waited
                    self._slots.release()
                    pending.append((i, None))
                else:
                    self._in_flight.add(slot)
                    pending.append((i, await self._producer.send(
                        self._settings.lane, self._with_reply_topic(line),
                        key=custom_id.encode())))
                    self.tally.sent_now += 1
            self._count_acknowledged(pending)
        while pending:
            await asyncio.gather(*(f for _, f in pending if f is not None))
            self._count_acknowledged(pending)

    def _count_acknowledged(self, pending: deque[tuple[int, asyncio.Future[object] | None]]
                            ) -> None:
        """``sent``: the lines from the top the broker holds (or that need no send)."""
        while pending and (pending[0][1] is None or pending[0][1].done()):
            i, future = pending.popleft()
            if future is not None:
                future.result()  # a send that failed stops the run, progress kept
            self._progress.sent = max(self._progress.sent, i + 1)

    def _with_reply_topic(self, line: bytes) -> bytes:
        """The line, its ``streamproc`` member naming this run's reply topic."""
        value = msgspec.json.decode(line)
        ext = dict(value.get("streamproc") or {})
        ext["reply_topic"] = self._settings.reply_topic
        ext.setdefault("submitted_at", time.time())
        value["streamproc"] = ext
        return msgspec.json.encode(value)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            write_progress(self._settings.progress_file, self._progress)
            self._on_progress(self.tally)

    def answered(self, slot: int, failed: bool, tokens: int) -> None:
        self._index.answered[slot] = True
        self.tally.done += 1
        self.tally.answered_now += 1
        self.tally.failed += failed
        self.tally.tokens_now += tokens
        if slot in self._in_flight:
            self._in_flight.discard(slot)
            self._slots.release()
        if self.tally.done == self.tally.total:
            self._all_answered.set()

    def is_pending(self, key: bytes | None) -> int | None:
        """The slot of a request of this batch still unanswered; None otherwise."""
        if key is None:
            return None
        slot = self._index.slot(key)
        return None if slot is None or self._index.answered[slot] else slot

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self._consumer

    @property
    def finished(self) -> bool:
        return self._all_answered.is_set()


class _Reader:
    """Reads the reply topic and writes each request's first answer."""

    def __init__(self, run: BatchRun, output: IO[bytes], errors: IO[bytes]) -> None:
        self._run = run
        self._output = output
        self._errors = errors

    async def run(self) -> None:
        while not self._run.finished:
            fetched = await self._run.consumer.getmany(timeout_ms=500)
            for records in fetched.values():
                for record in records:
                    self._take(record.key, record.value)

    def _take(self, key: bytes | None, value: bytes | None) -> None:
        slot = self._run.is_pending(key)
        if slot is None or not value:
            return
        try:
            message = wire.response_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if not wire.is_terminal(message):
            return
        line, failed = _output_line(message, value)
        (self._errors if failed else self._output).write(line + b"\n")
        (self._errors if failed else self._output).flush()
        tokens = message.usage.completion_tokens if isinstance(message, wire.FinalMessage) \
            else 0
        self._run.answered(slot, failed, tokens)


def _output_line(message: wire.ResponseMessage, value: bytes) -> tuple[bytes, bool]:
    """The Batch output line a terminal message carries, and whether it is a failure."""
    try:
        line = shapes.output_line_decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # A native message (a record the worker could not read as a line answers so):
        # kept as an error in the output format.
        code = message.code if isinstance(message, wire.ErrorMessage) else "failed"
        text = message.message if isinstance(message, wire.ErrorMessage) else str(message)
        line = shapes.OutputLine("", message.request_id, msgspec.Raw(b"null"),
                                 shapes.BatchError(code, text))
        return _output_encoder.encode(line), True
    response = _status_decoder.decode(line.response)
    status = response.status_code if response is not None else 0
    return _output_encoder.encode(line), line.error is not None or status != 200
