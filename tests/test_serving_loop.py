"""The serving loop alone: a scripted engine runner and a recording publisher, no broker
and no model. What the loop owes the engine (admissions within the policy's cap, keys to
drop or cancel) and the publisher (every event in order, each job ended once)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiokafka import TopicPartition

from streamproc.admission.policy import FixedWindowPolicy
from streamproc.channel import Job, WaitingQueue
from streamproc.engine.sequence import Outcome, PreparedRequest, TokenEvent
from streamproc.errors import EngineStepError
from streamproc.flow.ledger import Ticket
from streamproc.metrics.stats import WorkerStats
from streamproc.wire import GenerationParams, GenerationRequest, Timings, Usage
from streamproc.worker.serving import ServingLoop
from streamproc.worker.steps import StepResult

TP0, TP1 = TopicPartition("requests", 0), TopicPartition("requests", 1)


@dataclass
class ScriptedRunner:
    """One token per running request per step (token = how many it had), ending at its
    ``max_new_tokens``; fails the step whose number is in ``fail_steps`` (as out of memory
    if in ``oom_steps``)."""

    fail_steps: set[int] = field(default_factory=set)
    oom_steps: set[int] = field(default_factory=set)
    running: dict[int, tuple[PreparedRequest, int]] = field(default_factory=dict)
    posted: list[tuple[list[int], frozenset[int], frozenset[int]]] = field(
        default_factory=list)
    pending: list[tuple[list[PreparedRequest], frozenset[int], frozenset[int]]] = field(
        default_factory=list)
    widest: int = 0
    steps: int = 0
    recovered: int = 0
    free_device_bytes: int = 0

    async def start(self) -> None:
        pass

    def submit(self, admitted: list[PreparedRequest], abandon: frozenset[int],
               cancel: frozenset[int]) -> None:
        self.posted.append(([p.key for p in admitted], abandon, cancel))
        self.pending.append((admitted, abandon, cancel))

    @property
    def expecting(self) -> bool:
        return bool(self.pending)

    async def next_result(self) -> StepResult | Exception:
        await asyncio.sleep(0)
        self.steps += 1
        pending, self.pending = self.pending, []
        if self.steps in self.fail_steps | self.oom_steps:
            self.running.clear()
            return EngineStepError("RuntimeError: scripted failure",
                                   out_of_memory=self.steps in self.oom_steps)
        events = []
        for admitted, abandon, cancel in pending:
            self.running.update((p.key, (p, p.kept_tokens)) for p in admitted)
            for key in abandon:
                self.running.pop(key, None)
            events += [self._end(key, "cancelled") for key in cancel if key in self.running]
        self.widest = max(self.widest, len(self.running))
        for key, (prepared, made) in list(self.running.items()):
            self.running[key] = (prepared, made + 1)
            done = made + 1 >= prepared.kept_tokens + prepared.max_new_tokens
            events.append(TokenEvent(prepared, [made], f"<{made}>",
                                     _outcome("length", made + 1) if done else None))
            if done:
                del self.running[key]
        now = time.monotonic()
        return StepResult(events, 0.001, 0.0, 0.001, 0, now, time.time(), len(events), 0)

    def _end(self, key: int, reason: str) -> TokenEvent:
        prepared, made = self.running.pop(key)
        return TokenEvent(prepared, [], "", _outcome("cancelled", made))

    def recover(self) -> None:
        self.recovered += 1
        self.pending.clear()

    def stop(self) -> None:
        pass


def _outcome(reason: str, tokens: int) -> Outcome:
    return Outcome(reason, Usage(1, tokens), Timings(0.0, 0.0, 0.0))  # type: ignore[arg-type]


@dataclass
class RecordingPublisher:
    streams: dict[str, list[TokenEvent]] = field(default_factory=dict)
    failures: dict[str, tuple[str, bool]] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, job: Job, event: TokenEvent) -> None:
        assert job.request_id not in self.ended, f"{job.request_id} published after its end"
        self.streams.setdefault(job.request_id, []).append(event)
        self.changed.set()

    async def fail(self, job: Job, code: str, message: str, retriable: bool = False) -> None:
        assert job.request_id not in self.ended
        self.failures[job.request_id] = (code, retriable)
        self.changed.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async def wait() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout_s)

    def forget(self, job: Job) -> None:
        self.forgotten.append(job.request_id)

    @property
    def ended(self) -> set[str]:
        done = {rid for rid, events in self.streams.items() if events[-1].outcome}
        return done | set(self.failures)

    def tokens(self, request_id: str) -> list[int]:
        return [t for e in self.streams.get(request_id, []) for t in e.token_ids]


def job(rid: str, max_new: int, tp: TopicPartition = TP0, offset: int = 0) -> Job:
    request = GenerationRequest(request_id=rid, prompt="-",
                                params=GenerationParams(max_new_tokens=max_new))
    return Job(PreparedRequest(request, [1, 2], max_new, time.time()), Ticket(tp, offset, 1),
               "replies")


@dataclass
class Loop:
    serving: ServingLoop
    runner: ScriptedRunner
    publisher: RecordingPublisher
    waiting: WaitingQueue

    async def until(self, done: set[str]) -> None:
        await self.publisher.until(lambda: done <= self.publisher.ended)


@pytest.fixture
async def loop() -> AsyncIterator[Loop]:
    runner, publisher, waiting = ScriptedRunner(), RecordingPublisher(), WaitingQueue()
    serving = ServingLoop(runner, waiting, FixedWindowPolicy(2, 10_000, 0.0), publisher,
                          WorkerStats())
    await serving.start()
    task = asyncio.create_task(serving.run())
    yield Loop(serving, runner, publisher, waiting)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_every_job_streams_in_order_and_ends_once_within_the_cap(loop: Loop) -> None:
    lengths = {f"r{i}": 2 + i % 4 for i in range(7)}
    for rid, length in lengths.items():
        loop.waiting.put(job(rid, length))
    await loop.until(set(lengths))
    for rid, length in lengths.items():
        assert loop.publisher.tokens(rid) == list(range(length))
        assert [e.outcome is not None for e in loop.publisher.streams[rid]] == \
            [False] * (length - 1) + [True]
    assert loop.runner.widest == 2  # the fixed window's cap, never more
    assert loop.serving.running == 0


async def test_an_abandoned_partition_leaves_the_engine_and_publishes_nothing_more(
        loop: Loop) -> None:
    moved, kept = job("moved", 1000, TP1), job("kept", 30, TP0)
    loop.waiting.put(moved)
    loop.waiting.put(kept)
    await loop.publisher.until(lambda: len(loop.publisher.tokens("moved")) >= 3)
    assert loop.serving.abandon({TP1}) == 1
    published = len(loop.publisher.tokens("moved"))
    await loop.until({"kept"})
    assert len(loop.publisher.tokens("moved")) == published
    assert loop.publisher.forgotten == ["moved"]
    assert any(moved.prepared.key in abandon for _, abandon, _ in loop.runner.posted)
    assert "moved" not in loop.publisher.ended


async def test_a_cancel_reaches_the_engine_by_key_and_ends_the_stream(loop: Loop) -> None:
    loop.waiting.put(job("cut", 1000))
    await loop.publisher.until(lambda: bool(loop.publisher.tokens("cut")))
    assert loop.serving.cancel("cut") == 1
    await loop.until({"cut"})
    final = loop.publisher.streams["cut"][-1].outcome
    assert final is not None
    assert final.finish_reason == "cancelled"
    assert loop.serving.cancel("nobody") == 0


async def test_a_failed_step_fails_the_running_jobs_retriably_then_serves_on(
        loop: Loop) -> None:
    loop.runner.fail_steps = {3}
    loop.waiting.put(job("a", 1000))
    loop.waiting.put(job("b", 1000))
    await loop.until({"a", "b"})
    assert loop.publisher.failures == {"a": ("engine_error", True), "b": ("engine_error", True)}
    assert loop.runner.recovered == 1
    loop.waiting.put(job("after", 3))
    await loop.until({"after"})
    assert loop.publisher.tokens("after") == [0, 1, 2]


async def test_draining_admits_nothing_more_and_finishes_what_runs() -> None:
    runner, publisher, waiting = ScriptedRunner(), RecordingPublisher(), WaitingQueue()
    serving = ServingLoop(runner, waiting, FixedWindowPolicy(1, 10_000, 0.0), publisher,
                          WorkerStats())
    task = asyncio.create_task(serving.run())
    waiting.put(job("running", 20))
    await publisher.until(lambda: bool(publisher.tokens("running")))
    waiting.put(job("waiting", 5))
    assert await serving.drain(5.0)
    await task
    assert publisher.tokens("running") == list(range(20))
    assert "waiting" not in publisher.streams
    assert len(waiting) == 1  # left for Kafka to redeliver
