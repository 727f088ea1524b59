"""Departures and outages with real processes and a real broker (``kill -9`` and a frozen
worker: ``tests/test_resume.py``).

Whatever happens to workers or the broker, the client API hands each request's
stream over exactly once, in order, complete.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from streamproc import topics, wire
from streamproc.client import Result, ResultStream, StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.devtools import localkafka
from streamproc.engine.loader import LoadedModel
from streamproc.worker.app import Worker

from .helpers import reference_tokens, wait_for_lag_zero
from .processes import WorkerProcess, client_for, gather_then_stop, write_topics_file

pytestmark = [pytest.mark.kafka, pytest.mark.model]


Seen = list[tuple[int, int, int, int]]


async def follow(stream: ResultStream, started: asyncio.Event) -> tuple[Result, Seen]:
    """The stream as an API user sees it: where every chunk handed over starts and how much
    it carries (token offset, tokens, text offset, characters), then the end."""
    seen = []
    async for chunk in stream:
        seen.append((chunk.offset, len(chunk.token_ids), chunk.text_offset, len(chunk.text)))
        started.set()
    return await stream.result(), seen


def contiguous(seen: Seen) -> bool:
    """Each chunk starts exactly where the one before ended: no gap, nothing twice."""
    tokens = text = 0
    for offset, count, text_offset, chars in seen:
        if (offset, text_offset) != (tokens, text):
            return False
        tokens, text = tokens + count, text + chars
    return True


def params(i: int) -> wire.GenerationParams:
    # One in four samples without a seed: a resumed stream must still continue exactly.
    if i % 4 == 0:
        return wire.GenerationParams(max_new_tokens=48, temperature=0.9, top_p=0.95)
    return wire.GenerationParams(max_new_tokens=48)


async def submit_all(client: StreamprocClient, count: int
                     ) -> tuple[list[str], list[asyncio.Task[tuple[Result, Seen]]],
                                asyncio.Event]:
    prompts = [f"job {i}: " + "kafka " * (i % 9) for i in range(count)]
    started = asyncio.Event()
    streams = [await client.submit(p, params=params(i)) for i, p in enumerate(prompts)]
    return prompts, [asyncio.create_task(follow(s, started)) for s in streams], started


def assert_exactly_once(outcomes: list[tuple[Result, Seen]], count: int) -> None:
    assert len({r.request_id for r, _ in outcomes}) == count
    for result, seen in outcomes:
        assert contiguous(seen), f"{result.request_id}: {seen}"
        assert sum(c[1] for c in seen) == len(result.token_ids)
        assert result.usage.completion_tokens == len(result.token_ids)
        assert result.finish_reason in ("length", "stop")


def assert_greedy_matches(loaded: LoadedModel, prompts: list[str],
                          outcomes: list[tuple[Result, Seen]]) -> None:
    for i in (1, 2, 3, 5, 6, 7):
        ids = loaded.tokenizer(prompts[i]).input_ids
        assert outcomes[i][0].token_ids == reference_tokens(loaded, ids, 48)


async def assert_all_served(config: WorkerConfig, loaded: LoadedModel, prompts: list[str],
                            outcomes: list[tuple[Result, Seen]]) -> None:
    """Once, in order, complete, greedy ones as generate() has them, and nothing left in Kafka."""
    assert_exactly_once(outcomes, len(prompts))
    assert_greedy_matches(loaded, prompts, outcomes)
    assert await wait_for_lag_zero(config.bootstrap, config.group_id,
                                   config.topics.requests) == 0




async def test_two_workers_one_leaves_mid_run_the_other_takes_over(
        worker_config: WorkerConfig, loaded_model: LoadedModel, tmp_path: Path) -> None:
    topics_dir = write_topics_file(tmp_path / "topics", worker_config.topics)
    leaving = WorkerProcess(worker_config, topics_dir, tmp_path / "leaving.log",
                            "--drain-timeout", "0")
    staying = WorkerProcess(worker_config, topics_dir, tmp_path / "staying.log")
    await leaving.start()
    await staying.start()
    async with client_for(worker_config) as client:
        prompts, tasks, started = await submit_all(client, 200)
        await asyncio.wait_for(started.wait(), 60)
        assert await leaving.terminate() == 0
        outcomes = await gather_then_stop(worker_config, tasks, staying)
    await assert_all_served(worker_config, loaded_model, prompts, outcomes)
    assert staying.log.read_text().count("partitions assigned") >= 2  # it took over


@asynccontextmanager
async def own_broker(tmp_path: Path, tiny_model_dir: Path, group: str,
                     *worker_options: str) -> AsyncIterator[tuple[Path, WorkerConfig,
                                                                  WorkerProcess]]:
    """A broker of the test's own (so it can be stopped), topics of 2 partitions, and a
    worker process serving them, not yet started; the broker is stopped at the end."""
    state_dir = tmp_path / "broker"
    broker = await asyncio.to_thread(localkafka.start, state_dir, progress=lambda _: None)
    try:
        specs = [replace(s, partitions=2) for s in topics.load_specs()]
        await topics.apply(broker.bootstrap, specs)
        config = WorkerConfig(bootstrap=broker.bootstrap, topics=topics.topic_names(specs),
                              model=str(tiny_model_dir), group_id=f"{group}-{uuid.uuid4().hex}")
        worker = WorkerProcess(config, write_topics_file(tmp_path / "topics", config.topics),
                               tmp_path / "worker.log", *worker_options)
        yield state_dir, config, worker
    finally:
        await asyncio.to_thread(localkafka.stop, state_dir)


STRESS_RUNS = int(os.environ.get("STREAMPROC_STRESS_RUNS", "1"))
"""How many times the outage test runs: ``STREAMPROC_STRESS_RUNS=20 pytest -k broker_stops``
is the stress loop (not in CI: about a minute a run)."""


@pytest.mark.parametrize("run", range(STRESS_RUNS))
async def test_the_broker_stops_for_10s_mid_run_and_everything_completes(
        run: int, tiny_model_dir: Path, loaded_model: LoadedModel, tmp_path: Path) -> None:
    async with own_broker(tmp_path, tiny_model_dir, "outage",
                          "--max-batch-size", "4") as (state_dir, config, worker):
        await worker.start()
        # The first group on a fresh local broker joins without a coordinator error.
        assert "GroupCoordinatorNotAvailable" not in worker.log.read_text()
        async with client_for(config) as client:
            prompts, tasks, started = await submit_all(client, 40)
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.to_thread(localkafka.stop_broker_only, state_dir)
            assert sum(not t.done() for t in tasks) > 0, "all done before the outage"
            await asyncio.sleep(10)
            await asyncio.to_thread(localkafka.restart_broker, state_dir)
            outcomes = await gather_then_stop(config, tasks, worker)
        await assert_all_served(config, loaded_model, prompts, outcomes)


async def test_a_worker_whose_broker_is_gone_still_stops_on_sigterm(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Flushing, committing and closing would each wait for the broker forever; the worker
    gives them --close-timeout in all and exits, leaving the uncommitted to the next owner."""
    async with own_broker(tmp_path, tiny_model_dir, "gone", "--drain-timeout", "1",
                          "--close-timeout", "3") as (state_dir, config, worker):
        await worker.start()
        async with client_for(config) as client:
            _, tasks, started = await submit_all(client, 8)
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.to_thread(localkafka.stop_broker_only, state_dir)
            # Its requests may all be answered and committed by now; a status report queued
            # with no broker to take it still leaves a step that cannot finish.
            await asyncio.sleep(config.status_interval_s + 0.5)
            assert await worker.terminate(timeout_s=30) == 0
            for task in tasks:
                task.cancel()
        # Either way close_within gave a step up: by its timeout or cut short inside aiokafka.
        assert "going on without it" in worker.log.read_text()


async def test_partitions_revoked_with_the_broker_gone_are_let_go_within_the_close_timeout(
        tiny_model_dir: Path, loaded_model: LoadedModel, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A rebalance flushes and commits before letting partitions go; a flush that waits on
    a broker that is not there would hold up the whole group, so it gets --close-timeout."""
    async with own_broker(tmp_path, tiny_model_dir, "revoked") as (state_dir, config, _):
        served = replace(config, device="cpu", close_timeout_s=1, status_interval_s=0.1)
        worker = Worker(served, loaded_model)
        await worker.start()
        try:
            await asyncio.to_thread(localkafka.stop_broker_only, state_dir)
            await asyncio.sleep(0.5)  # a status report is now queued that cannot be delivered
            owned = {TopicPartition(t, p) for t in config.topics.requests for p in range(2)}
            await asyncio.wait_for(worker.on_revoked(owned), 30)
        finally:
            await worker.stop()
    assert "rebalance: flushing published messages did not finish" in caplog.text \
        or "rebalance: flushing published messages was cut short" in caplog.text
