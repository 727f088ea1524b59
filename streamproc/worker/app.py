"""The composition root: the one place that knows every stage and owns its tasks.

Shutdown is two-phase: stop fetching and hand back what was not started, let
running requests finish (up to ``drain_timeout_s``), then commit what was
published and close the clients.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from streamproc import kafka, wire
from streamproc.admission.adaptive import AdaptiveController, ControllerSettings
from streamproc.admission.policy import AdaptivePolicy, BatchPolicy, FixedWindowPolicy
from streamproc.channel import Job, WaitingQueue
from streamproc.config import WorkerConfig
from streamproc.engine.catalog import model_names
from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel, load_tokenizer
from streamproc.engine.sequence import unserved_event
from streamproc.engine.threads import apply_serving_threads, usable_cores
from streamproc.errors import ConfigError, PublishError
from streamproc.flow.kv_budget import KvBudget
from streamproc.flow.ledger import Ledger, Ticket
from streamproc.ingest.attempts import AttemptLog
from streamproc.ingest.consumer import Ingest
from streamproc.ingest.control import CancelledIds, ControlListener
from streamproc.ingest.prepare import Preparer
from streamproc.ingest.resume import Resumer
from streamproc.metrics.lag_monitor import LagMonitor, LagReport
from streamproc.metrics.prometheus import LiveGauges, WorkerCollector, serve
from streamproc.metrics.stats import WorkerStats
from streamproc.metrics.trace import StepTrace
from streamproc.publish.publisher import ChunkPacing, Publisher
from streamproc.worker.commits import Committer
from streamproc.worker.engine_process import EngineProcess, EngineSpec
from streamproc.worker.engine_thread import EngineThread
from streamproc.worker.liveness import HEARTBEAT_INTERVAL_MS, SESSION_TIMEOUT_MS, Liveness
from streamproc.worker.serving import ServingLoop
from streamproc.worker.steps import EngineRunner

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: WorkerConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ledger = Ledger(config.max_inflight, config.max_inflight_tokens)
        self.stats = WorkerStats()
        self.waiting = WaitingQueue(len(config.topics.requests))
        self.cancelled = CancelledIds()
        self._producer = kafka.producer(config.bootstrap, config.security,
                                        linger_ms=config.linger_ms)
        self._consumer = kafka.consumer(config.bootstrap, security=config.security,
                                        group_id=config.group_id,
                                        max_poll_records=config.max_inflight,
                                        session_timeout_ms=SESSION_TIMEOUT_MS,
                                        heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)
        self.liveness = Liveness()
        self.attempts = AttemptLog(
            kafka.consumer(config.bootstrap, security=config.security, group_id=None),
            self._producer, config.topics.attempts)
        pacing = ChunkPacing(config.chunk_rate, config.itl_target_ms / 1000 / 2)
        self._publisher = Publisher(self._producer, config.topics.dead_letter, self._done,
                                    self._publish_failed,
                                    coalesce=config.coalesce, pacing=pacing,
                                    stats=self.stats, before_first=self.attempts.durable,
                                    check_alive=self.liveness.check)
        self._resumer = Resumer(
            kafka.consumer(config.bootstrap, security=config.security, group_id=None),
            self._publisher, self.stats)
        kv_budget = KvBudget.of(config.kv_memory_bytes, loaded.kv_bytes_per_token)
        if config.kv_memory_bytes and not kv_budget.bounded:
            log.warning("--kv-memory-bytes is ignored: this model's config does not say how "
                        "many bytes a token's keys and values take")
        self._bytes_per_token = loaded.kv_bytes_per_token
        self._preparer = preparer = Preparer(load_tokenizer(config.model), loaded.max_context,
                            config.max_new_tokens_cap, config.topics,
                            max_prompt_tokens=config.max_prompt_tokens,
                            max_span_tokens=kv_budget.tokens,
                            models=model_names(config.model, config.model_aliases))
        self.ingest = Ingest(self._consumer, preparer, self.waiting, self.ledger,
                             self._publisher, self.stats,
                             lanes=config.topics.requests, lane_backlog=config.lane_backlog,
                             cancelled=self.cancelled,
                             max_message_bytes=config.max_message_bytes,
                             attempts=self.attempts, poison_attempts=config.poison_attempts,
                             resumer=self._resumer)
        self.controller, self.policy = _batch_policy(config)
        self._trace = StepTrace(Path(config.trace_file)) if config.trace_file else None
        self.serving = ServingLoop(_engine_runner(config, loaded), self.waiting,
                                   self.policy, self._publisher, self.stats,
                                   controller=self.controller,
                                   lag=self._backlog,
                                   prefill_chunk_tokens=config.prefill_chunk_tokens,
                                   trace=self._trace,
                                   on_admit=lambda job: self.attempts.admitted(job.ticket,
                                                                               job.deaths),
                                   on_handback=self._handed_back, kv_budget=kv_budget)
        self._device = loaded.device
        self._control = ControlListener(
            kafka.consumer(config.bootstrap, security=config.security, group_id=None),
            config.topics.control, self.cancel)
        self._monitor = LagMonitor(config.bootstrap, config.group_id, config.topics,
                                   security=config.security)
        self.registry = CollectorRegistry()
        self.registry.register(WorkerCollector(self.stats, self.gauges, lambda: self.lag))
        self.lag: LagReport | None = None
        self._metrics_server: Any = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._answers: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._committer = Committer(self._consumer, self.ledger, config.close_timeout_s,
                                    self.attempts.committed)
        self._fatal: asyncio.Future[None] | None = None
        """Failed by what no stage can carry on from (a publish the broker refused)."""

    async def start(self) -> None:
        self._fatal = asyncio.get_running_loop().create_future()
        if not self.config.engine_process:  # else the engine's process sizes its own pool
            threads = apply_serving_threads(self._device, self.config.torch_threads)
            if threads is not None:
                log.info("torch uses %d CPU thread(s) of %d usable cores", threads,
                         usable_cores())
        await self.serving.start()
        self._bound_kv_to_device()
        await self._producer.start()
        await self._consumer.start()
        control = self.config.topics.control
        await self._control.start(await self._producer.partitions_for(control))
        await self.attempts.start(
            await self._producer.partitions_for(self.config.topics.attempts))
        await self._resumer.start()
        # Started here, not in its loop: a stop that cancelled the loop while the monitor
        # still connected would leave its connection open.
        await self._monitor.start()
        self._consumer.subscribe(list(self.config.topics.requests), listener=_Revoke(self))
        self._tasks = {
            "ingest": asyncio.create_task(self.ingest.run(), name="ingest"),
            "serving": asyncio.create_task(self.serving.run(), name="serving"),
            "commit": asyncio.create_task(self._commit_loop(), name="commit"),
            "status": asyncio.create_task(self._status_loop(), name="status"),
            "lag": asyncio.create_task(self._lag_loop(), name="lag"),
            "control": asyncio.create_task(self._control.run(), name="control"),
            "attempts": asyncio.create_task(self.attempts.run(), name="attempts"),
            "liveness": asyncio.create_task(self.liveness.run(), name="liveness"),
        }
        if self.config.metrics_port:
            self._metrics_server = serve(self.registry, self.config.metrics_address,
                                         self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_address,
                     self.config.metrics_port)
        # The model, tokenizer and imported modules live as long as the process: take them
        # out of the collector's reach, or each full collection walks all of them and
        # stalls the event loop for 100+ ms (a time-to-first-token outlier each time).
        gc.collect()
        gc.freeze()
        log.info("worker started: group %s, lanes %s", self.config.group_id,
                 ", ".join(self.config.topics.requests))

    def _bound_kv_to_device(self) -> None:
        """Without a KV budget set, on a GPU: a fraction of what the warm engine left free."""
        budget = KvBudget.of(device_kv_bytes(self.config, self.serving.free_device_bytes),
                             self._bytes_per_token)
        if not budget.bounded:
            return
        self.serving.bound_kv(budget)
        self._preparer.max_span_tokens = budget.tokens
        log.info("KV budget: %d tokens (%.0f%% of %.1f GiB free on the device)",
                 budget.tokens, self.config.kv_memory_fraction * 100,
                 self.serving.free_device_bytes / 2**30)

    async def wait_failed(self) -> None:
        """Return (raising its error) when any stage task ends on its own."""
        fatal = [self._fatal] if self._fatal is not None else []
        done, _ = await asyncio.wait([*self._tasks.values(), *fatal],
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def stop(self) -> None:
        """Idempotent two-phase shutdown."""
        if self._stopped:
            return
        self._stopped = True
        await _cancel(self._tasks.pop("ingest", None))
        await _cancel(self._tasks.pop("control", None))
        await _cancel(self._tasks.pop("attempts", None))
        handed_back = self.waiting.drop()
        log.info("stopping: %d waiting requests handed back, %d running to drain",
                 len(handed_back), self.serving.running)
        # A stalled worker may have lost its partitions: it publishes nothing more.
        drain_s = 0.0 if self.liveness.tripped else self.config.drain_timeout_s
        if not await self.serving.drain(drain_s):
            self.serving.hand_back_running()
        for name in ("serving", "commit", "status", "lag", "liveness"):
            await _cancel(self._tasks.pop(name, None))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.serving.close()
        if self._trace is not None:
            self._trace.close()
        await self._close_kafka()
        log.info("worker stopped")

    async def _close_kafka(self) -> None:
        """Flush, commit and close the clients within ``close_timeout_s`` in all: with the
        broker gone each of them would wait for it forever. What is not committed then is
        served again by the partitions' next owner (at least once)."""
        await kafka.steps_within((
            ("shutdown: flushing published messages", self._publisher.flush),
            ("shutdown: committing offsets", self.commit),
            ("shutdown: closing the lag monitor", self._monitor.stop),
            ("shutdown: closing the consumer", self._consumer.stop),
            ("shutdown: closing the control listener", self._control.stop),
            ("shutdown: closing the attempts log", self.attempts.stop),
            ("shutdown: closing the takeover reader", self._resumer.stop),
            ("shutdown: closing the producer", self._producer.stop),
        ), self.config.close_timeout_s)

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        await self._committer.commit(only)

    def cancel(self, request_id: str, published_at: float | None = None) -> None:
        """Cancel ``request_id`` wherever it is here: waiting, running, or not read yet
        (remembered from ``published_at``, wall-clock seconds; default now)."""
        self.cancelled.add(request_id, published_at)
        waiting = self.waiting.remove(lambda j: j.request_id == request_id)
        for job in waiting:
            task = asyncio.create_task(self.answer_cancelled(job))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)
        running = self.serving.cancel(request_id)
        # At start the worker reads back an hour of cancellations, most of them for
        # requests long finished: only those that stop something here are news.
        log.log(logging.INFO if waiting or running else logging.DEBUG,
                "cancel %s: %d waiting, %d running", request_id, len(waiting), running,
                extra={"request_id": request_id})

    async def answer_cancelled(self, job: Job) -> None:
        """A final ``cancelled`` for a job that never ran."""
        event = unserved_event(job.prepared, time.time(), "cancelled")
        assert event.outcome is not None
        self.stats.finished(event.outcome)
        await self._publisher.publish(job, event)

    def status(self) -> wire.WorkerStatus:
        return wire.WorkerStatus(
            worker_id=self.worker_id, group_id=self.config.group_id, at=time.time(),
            tokens_per_s=self.stats.rate.tokens_per_s,
            avg_tokens_per_request=self.stats.avg_tokens_per_request,
            running=self.serving.running, waiting=len(self.waiting),
            held_requests=self.ledger.requests, paused=self.ingest.paused)

    def gauges(self) -> LiveGauges:
        """Called on the metrics thread: reads plain attributes only."""
        gpu = {}
        if self._device.type == "cuda":
            gpu = {"allocated": torch.cuda.memory_allocated(self._device),
                   "reserved": torch.cuda.memory_reserved(self._device)}
        return LiveGauges(
            running=self.serving.running, waiting=len(self.waiting),
            inflight_requests=self.ledger.requests, inflight_tokens=self.ledger.tokens,
            kv_cache_tokens=self.serving.kv_tokens,
            batch_window_s=self.policy.window_s, admission_size=self.policy.admit_size,
            running_cap=self.policy.running_cap,
            chunk_interval_s=self._publisher.chunk_interval_s,
            paused_partitions=self.ingest.paused_partitions, gpu_memory_bytes=gpu)

    def _backlog(self) -> int:
        """The lag the controller weighs: the group's as last sampled, or, if more, this
        worker's own (unread on its partitions, plus what it holds), fresh at every fetch,
        so a wave is seen as it arrives rather than at the next sample."""
        own = self.ingest.unread() + len(self.waiting) + self.serving.running
        return max(self.lag.lag if self.lag else 0, own)

    async def _lag_loop(self) -> None:
        while True:
            try:
                self.lag = await self._monitor.sample()
            except KafkaError as exc:
                log.warning("lag not refreshed: %s", exc)
            await asyncio.sleep(self.config.lag_interval_s)

    def _done(self, ticket: Ticket) -> None:
        if self.ledger.done(ticket):
            self.attempts.done(ticket)

    def _handed_back(self, job: Job) -> None:
        """A running job left cleanly (its partition moved, or the drain ran out of time):
        no death to count against it."""
        self.attempts.handed_back(job.ticket, job.deaths)

    def _publish_failed(self, ticket: Ticket, exc: BaseException) -> None:
        """A terminal message the broker would not take: the worker fails, loudly, and
        its partitions' next owner serves the record again. (Of an earlier assignment:
        already someone else's to serve.)"""
        if self._fatal is not None and self.ledger.owns(ticket) and not self._fatal.done():
            self._fatal.set_exception(PublishError(
                f"publishing for {ticket.tp.topic}[{ticket.tp.partition}]@{ticket.offset} "
                f"failed after the producer's retries: {exc!r}"))

    async def _status_loop(self) -> None:
        while True:
            try:
                await self._producer.send(self.config.topics.status, wire.encode(self.status()),
                                          key=self.worker_id.encode())
            except KafkaError as exc:  # a missing status topic must not stop serving
                log.warning("status not published: %s", exc)
            await asyncio.sleep(self.config.status_interval_s)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        dropped = self.waiting.drop(revoked)
        abandoned = self.serving.abandon(revoked)
        # Bounded as at shutdown: a flush stuck on an unreachable partition leader would
        # hold up the whole group's rebalance, and past its timeout get this worker expelled.
        # What is not committed is served again by the new owner (at least once).
        await self._committer.revoke(revoked, self._publisher.flush)
        self.attempts.revoked(revoked)
        log.info("partitions revoked: %s; %d waiting and %d running requests handed back",
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked), len(dropped),
                 abandoned)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval_s)
            await self.commit()


def _batch_policy(config: WorkerConfig) -> tuple[AdaptiveController | None, BatchPolicy]:
    if config.batch_policy == "fixed":
        return None, FixedWindowPolicy(config.max_batch_size, config.max_batch_tokens,
                                       config.batch_window_ms / 1000)
    controller = AdaptiveController(ControllerSettings(
        ttft_target_s=config.ttft_target_ms / 1000, itl_target_s=config.itl_target_ms / 1000,
        window_min_s=config.window_min_ms / 1000, window_max_s=config.window_max_ms / 1000,
        running_max=config.max_batch_size, lag_high=config.max_inflight))
    return controller, AdaptivePolicy(controller, config.max_batch_size,
                                      config.max_batch_tokens)


class _Revoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._worker.ledger.assign(set(assigned))
        log.info("partitions assigned: %s",
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a stage and wait for it. A stage that already ended with an error (what
    :meth:`Worker.wait_failed` reports) must not cut the rest of the shutdown short."""
    if task is None:
        return
    # Cancelled again until it ends: on Python 3.11, a wait_for inside the stage drops a
    # cancellation that races its inner future's completion, and the stage would run on.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with suppress(asyncio.CancelledError):
        try:
            task.result()
        except Exception as exc:
            log.warning("stage %s had ended with an error: %r", task.get_name(), exc)


def _engine_runner(config: WorkerConfig, loaded: LoadedModel) -> EngineRunner:
    if config.engine_process:
        return EngineProcess(EngineSpec(config.model,
                                        config.device, config.allow_unsafe_weights,
                                        config.prefill_chunk_tokens, config.torch_threads,
                                        config.prefix_cache_bytes))
    if loaded.model is None:
        raise ConfigError("engine_process is off, but the model was only described "
                          "(describe_model): load it with load_model")
    return EngineThread(Engine(loaded, prefill_chunk_tokens=config.prefill_chunk_tokens,
                               prefix_cache_bytes=config.prefix_cache_bytes))


def device_kv_bytes(config: WorkerConfig, free_device_bytes: int) -> int:
    """The KV budget taken from the device's free memory: only where none is set."""
    if config.kv_memory_bytes:
        return 0
    # The prefix cache fills later, on the same device: its bound comes off first.
    usable = max(0, free_device_bytes - config.prefix_cache_bytes)
    return int(usable * config.kv_memory_fraction)
