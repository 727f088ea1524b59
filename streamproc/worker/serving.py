"""The loop that feeds the engine: admit per the batching policy, publish, record.

The forward pass runs off the event loop, on the engine's own thread or in its own
process (:mod:`streamproc.worker.steps`), so Kafka I/O never waits behind the model, and
the model never waits for the event loop: the engine runs the next step as soon as one
ends, while the loop publishes what the last one produced and records its statistics
(feeding the controller). Each time a step's result comes in, the loop retires finished jobs,
decides and posts the next admissions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from aiokafka import TopicPartition

from streamproc.admission.adaptive import AdaptiveController
from streamproc.admission.policy import BatchDecision, BatchPolicy
from streamproc.channel import Job, WaitingQueue
from streamproc.engine.sequence import TokenEvent
from streamproc.errors import EngineStepError
from streamproc.flow.kv_budget import UNBOUNDED, KvBudget
from streamproc.metrics.stats import WorkerStats
from streamproc.metrics.trace import StepRecord, StepTrace
from streamproc.worker.steps import EngineRunner, StepResult

log = logging.getLogger(__name__)


class Publishing(Protocol):
    """What the loop needs of :class:`~streamproc.publish.publisher.Publisher`."""

    async def publish(self, job: Job, event: TokenEvent) -> None: ...

    async def fail(self, job: Job, code: str, message: str,
                   retriable: bool = False) -> None: ...

    def forget(self, job: Job) -> None: ...


class ServingLoop:
    def __init__(self, engine: EngineRunner, waiting: WaitingQueue, policy: BatchPolicy,
                 publisher: Publishing, stats: WorkerStats, *,
                 controller: AdaptiveController | None = None,
                 lag: Callable[[], int] = lambda: 0, prefill_chunk_tokens: int = 0,
                 trace: StepTrace | None = None,
                 on_admit: Callable[[Job], object] = lambda job: None,
                 on_handback: Callable[[Job], object] = lambda job: None,
                 kv_budget: KvBudget = UNBOUNDED) -> None:
        """``kv_budget``: admissions wait while the running batch could outgrow it."""
        self._engine = engine
        self._kv_budget = kv_budget
        self._on_admit, self._on_handback = on_admit, on_handback
        self._chunk_tokens = prefill_chunk_tokens
        self._trace = trace
        self._stats = stats
        self._controller = controller
        self._lag = lag
        self._waiting = waiting
        self._policy = policy
        self._publisher = publisher
        self._jobs: dict[int, Job] = {}
        self._progress: dict[int, tuple[list[int], list[str]]] = {}
        """What each running job generated so far, to run it again after an out-of-memory
        step from where it stood."""
        self._last_token_at: dict[int, float] = {}
        self._abandoned: set[int] = set()
        self._cancelled: set[int] = set()
        self._outbox: deque[tuple[Job, TokenEvent]] = deque()
        """What the last step produced, published while the next one runs."""
        self._unrecorded: tuple[StepResult, int, int] | None = None
        """The last step and the jobs it ran with, recorded while the next one runs."""
        self.kv_tokens = 0
        """Real tokens in the KV cache after the last step (a plain int, for gauges)."""
        self._draining = False
        self._idle = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._jobs)

    async def start(self) -> None:
        """Warm the engine up and start it; :meth:`run` then serves."""
        await self._engine.start()

    @property
    def free_device_bytes(self) -> int:
        return self._engine.free_device_bytes

    def bound_kv(self, budget: KvBudget) -> None:
        """Admit within ``budget`` from now on."""
        self._kv_budget = budget

    async def run(self) -> None:
        """Serve until cancelled, or until drained when :meth:`drain` was called."""
        try:
            while not (self._draining and not self._jobs):
                await self._iterate()
            await self._send_outbox()
            self._record_last()
        finally:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Admit nothing more; wait for running requests to finish. True if they did."""
        self._draining = True
        self._waiting.wake()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("%d requests still running after %.1fs; handing them back",
                        len(self._jobs), timeout_s)
            return False
        return True

    def abandon(self, partitions: set[TopicPartition]) -> int:
        """Stop running the jobs of ``partitions`` (revoked: their new owner redoes them).
        They leave the engine at its next step without a final message."""
        keys = [k for k, job in self._jobs.items() if job.tp in partitions]
        for key in keys:
            job = self._jobs.pop(key)
            self._progress.pop(key, None)
            self._publisher.forget(job)
            self._on_handback(job)
            self._last_token_at.pop(key, None)
        # Also what a publish under way has not reached yet: nothing more of theirs goes out.
        self._outbox = deque((job, e) for job, e in self._outbox if job.tp not in partitions)
        self._abandoned.update(keys)
        return len(keys)

    def cancel(self, request_id: str) -> int:
        """End the running jobs of ``request_id`` at the next step, with a final message."""
        keys = [k for k, job in self._jobs.items() if job.request_id == request_id]
        self._cancelled.update(keys)
        return len(keys)

    def hand_back_running(self) -> list[Job]:
        """After a drain that ran out of time: the jobs still running, now handed back
        (their records are served again by the partitions' next owner)."""
        jobs = list(self._jobs.values())
        for job in jobs:
            self._on_handback(job)
        return jobs

    def close(self) -> None:
        self._engine.stop()

    async def _iterate(self) -> None:
        decision = self._decide()
        # A job one death from poison runs alone: nothing joins it.
        alone = any(job.alone for job in self._jobs.values())
        fits = self._fits_kv if self._kv_budget.bounded else None
        admitted = [] if self._draining or alone else \
            self._waiting.take(decision.admit, running=len(self._jobs), fits=fits)
        started = time.monotonic()
        for job in admitted:
            self._on_admit(job)
            self._jobs[job.prepared.key] = job
            self._stats.engine_queue.observe(started - job.enqueued_at)
        abandon, self._abandoned = frozenset(self._abandoned), set()
        cancel, self._cancelled = frozenset(self._cancelled), set()
        if admitted or abandon or cancel:
            self._engine.submit([j.prepared for j in admitted], abandon, cancel)
        if not self._jobs and not self._engine.expecting:
            await self._send_outbox()
            self._record_last()
            if not self._draining:
                await self._waiting.wait_for_arrival(decision.wait_s)
            return
        await self._send_outbox()  # the last step's tokens, while the next one computes
        self._record_last()
        done = await self._engine.next_result()
        if isinstance(done, Exception):
            await self._fail_running(done)
            return
        self._unrecorded = (done, len(self._jobs), len(admitted))
        self.kv_tokens = done.kv_tokens
        self._outbox.extend(self._settle(done.events))

    def _record_last(self) -> None:
        """Statistics and controller feedback of the last step, if not yet recorded."""
        if self._unrecorded is None:
            return
        (done, jobs, admitted), self._unrecorded = self._unrecorded, None
        stats = self._stats
        stats.step(sum(len(e.token_ids) for e in done.events), done.busy_s)
        if done.prefill_s:
            stats.prefill.observe(done.prefill_s)
        if done.decode_s:
            stats.decode_step.observe(done.decode_s)
        stats.batch_sequences.observe(jobs)
        stats.batch_tokens.observe(done.kv_tokens)
        stats.prefix = done.prefix
        gaps, firsts = [], []
        for event in done.events:
            key = event.source.key
            previous = self._last_token_at.get(key)
            if event.token_ids and previous is not None:
                gaps.append(done.ended - previous)
                stats.inter_token.observe(done.ended - previous)
            elif event.token_ids:
                firsts.append(done.ended_wall - event.source.origin_ts)
            # Only jobs still running are remembered: finished or abandoned ones left
            # self._jobs already, and their entry must not come back.
            if key in self._jobs:
                self._last_token_at[key] = done.ended
            else:
                self._last_token_at.pop(key, None)
        self._feed_controller(done, gaps, firsts)
        if self._trace is not None:
            self._trace.step(StepRecord(done.ended, done.decode_rows, done.decode_s,
                                        done.prefill_tokens, done.prefill_s, done.busy_s,
                                        jobs, admitted, self._policy.running_cap,
                                        len(self._waiting)))

    def _feed_controller(self, done: StepResult, gaps_s: list[float],
                         ttfts_s: list[float]) -> None:
        if self._controller is None:
            return
        self._controller.observe_step(done.ended, gaps_s, ttfts_s,
                                      decode_rows=done.decode_rows, decode_s=done.decode_s,
                                      prefill_tokens=done.prefill_tokens,
                                      prefill_s=done.prefill_s)
        adjustment = self._controller.adjust(time.monotonic(), self._lag())
        if adjustment is not None:
            self._stats.window_changes[adjustment.reason] += 1
            if self._trace is not None:
                self._trace.decision(adjustment)

    def _fits_kv(self, taken: list[Job], job: Job) -> bool:
        spans = [_span(j) for j in (*self._jobs.values(), *taken, job)]
        return self._kv_budget.fits(spans)

    def _decide(self) -> BatchDecision:
        # No decision looks past one full batch of the queue: do not measure the rest.
        # Running as the loop knows it: admissions the engine has not taken yet count.
        return self._policy.decide(self._waiting.prompt_tokens(self._policy.running_cap),
                                   self._waiting.oldest_wait_s(time.monotonic()),
                                   len(self._jobs), self._prefilling_tokens())

    def _prefilling_tokens(self) -> int:
        """What the next step prefills whatever is admitted: a chunk of a long prompt
        that has no first token yet (the engine works on one such prompt at a time)."""
        if not self._chunk_tokens:
            return 0
        for key, job in self._jobs.items():
            if key not in self._last_token_at and \
                    len(job.prepared.prompt_ids) > self._chunk_tokens:
                return self._chunk_tokens
        return 0

    def _settle(self, events: list[TokenEvent]) -> list[tuple[Job, TokenEvent]]:
        """Match events to their jobs and retire the finished ones now, so the next
        decision sees the engine's real occupancy; the sends come later."""
        settled = []
        for event in events:
            key = event.source.key
            job = self._jobs.get(key)
            if job is None:  # abandoned while this step ran
                continue
            if event.outcome is not None:
                del self._jobs[key]
                self._progress.pop(key, None)
                self._stats.finished(event.outcome)
            else:
                tokens, text = self._progress.setdefault(key, ([], []))
                tokens += event.token_ids
                text.append(event.text)
            settled.append((job, event))
        return settled

    async def _send_outbox(self) -> None:
        # Popped one at a time, not taken whole: abandon() may drop entries meanwhile.
        while self._outbox:
            job, event = self._outbox.popleft()
            await self._publisher.publish(job, event)

    async def _fail_running(self, exc: Exception) -> None:
        """A failed step cannot be pinned on one request: fail them all, retriably — or,
        when it ran out of memory, run them again in a batch half as big."""
        if isinstance(exc, EngineStepError) and exc.out_of_memory and self._jobs:
            self._retry_smaller(exc)
            return
        log.error("engine step failed; failing %d running requests", len(self._jobs),
                  exc_info=exc)
        jobs, self._jobs = list(self._jobs.values()), {}
        self._progress.clear()
        self._last_token_at.clear()
        for job in jobs:
            self._stats.failed("engine_error")
            await self._publisher.fail(job, "engine_error", f"{type(exc).__name__}: {exc}",
                                       retriable=True)
        self._engine.recover()

    def _retry_smaller(self, exc: EngineStepError) -> None:
        """Put the running jobs back at the head of the queue, each to continue from the
        tokens it has (its stream goes on: same attempt, same publisher state), and halve
        what the KV budget lets run together."""
        jobs = list(self._jobs.values())
        spans = [_span(j) for j in jobs]
        self._kv_budget = KvBudget(max(max(spans), len(spans) * max(spans) // 2))
        again = []
        for job in jobs:
            tokens, text = self._progress.pop(job.prepared.key, ([], []))
            again.append(replace(job, prepared=job.prepared.continued(tokens, "".join(text))))
        self._jobs = {}
        self._last_token_at.clear()
        self._stats.oom_retries += len(jobs)
        log.warning("engine step ran out of memory (%s): %d running requests go again, at "
                    "most %d tokens of KV memory from now on", exc, len(jobs),
                    self._kv_budget.tokens)
        self._waiting.put_front(again)
        self._engine.recover()


def _span(job: Job) -> int:
    """The cache positions ``job`` may come to hold: its prompt and every new token."""
    return len(job.prepared.prompt_ids) + job.prepared.max_new_tokens
