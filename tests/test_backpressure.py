"""Backpressure on a real broker: lag states, producer admission policies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from streamproc import kafka, wire
from streamproc.client import StreamprocClient
from streamproc.config import TopicNames, WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.errors import OverloadedError
from streamproc.flow.admission import AdmissionPolicy
from streamproc.metrics.lag_monitor import LagMonitor
from streamproc.worker.app import Worker

from .helpers import (
    eventually,
    publish_requests,
    run_cli,
    topic_partitions,
    wait_for_lag_zero,
)
from .processes import write_topics_file

pytestmark = pytest.mark.kafka


async def publish_small(bootstrap: str, topic: str, count: int, new_tokens: int = 2,
                        partition: int | None = None) -> None:
    """``count`` small requests, keyed by id, or all to ``partition`` if given."""
    await publish_requests(bootstrap, topic, (
        wire.GenerationRequest(
            request_id=f"pre-{i}", prompt="queued",
            params=wire.GenerationParams(max_new_tokens=new_tokens, ignore_eos=True))
        for i in range(count)), partition=partition)


@pytest.fixture
async def monitor(bootstrap: str, topic_names: TopicNames) -> AsyncIterator[LagMonitor]:
    running = LagMonitor(bootstrap, "lag-states", topic_names, window=3)
    await running.start()
    yield running
    await running.stop()


async def joined_member(bootstrap: str, topics: TopicNames, group_id: str = "lag-states"
                        ) -> AIOKafkaConsumer:
    """A group member that holds its partitions and commits only when told to."""
    member = kafka.consumer(bootstrap, topics.requests[0], group_id=group_id)
    await member.start()
    while not member.assignment():
        await member.getmany(timeout_ms=200)
    return member


async def commit_to(member: AIOKafkaConsumer, topic: str, offset: int) -> None:
    tps = [tp for tp in member.assignment() if tp.topic == topic]
    await member.commit({tp: offset if tp.partition == 0 else 0 for tp in tps})


async def test_lag_monitor_reports_stop_stall_warn_and_ok(
        bootstrap: str, topic_names: TopicNames, monitor: LagMonitor, tmp_path: Path) -> None:
    lane = topic_names.requests[0]
    producer = kafka.producer(bootstrap)
    await producer.start()

    async def publish(count: int) -> None:
        for _ in range(count):
            await producer.send(lane, b"{}", partition=0)
        await producer.flush()

    await publish(10)
    assert (await monitor.sample()).status == "STOP"  # lag, and nobody in the group

    member = await joined_member(bootstrap, topic_names)
    await commit_to(member, lane, 2)
    for _ in range(3):  # a member that stopped committing
        report = await monitor.sample()
    assert report.status == "STALL"
    assert report.members == 1
    assert max(p.oldest_age_s for p in report.partitions) > 0

    for step in range(3):  # commits move, but arrivals outpace them
        await publish(10)
        await commit_to(member, lane, 3 + step)
        report = await monitor.sample()
    assert report.status == "WARN"

    end = report.partitions[0].end_offset
    await commit_to(member, lane, end)
    report = await monitor.sample()
    assert (report.status, report.lag) == ("OK", 0)

    code, out, err = await run_cli(
        "lag", "--bootstrap", bootstrap, "--group", "lag-states", "--once", "--json",
        "--window", "1", "--topics-dir", str(write_topics_file(tmp_path, topic_names)))
    assert code == 0, err
    [group] = json.loads(out)["groups"]
    assert group["status"] == "OK"
    assert {"lag", "oldest_age_s", "drain_s"} <= set(group["partitions"][0])
    await member.stop()
    await producer.stop()


async def test_a_worker_leans_on_its_backlog_before_the_lag_is_sampled(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    # Lag sampled once, at start, and never again; room for 4 requests at a time.
    config = replace(worker_config, lag_interval_s=3600.0, max_inflight=4, max_batch_size=4)
    serving = Worker(config, loaded_model)
    await serving.start()
    try:
        await eventually(lambda: serving.lag is not None)  # the one sample: before the wave
        await publish_small(config.bootstrap, config.topics.requests[0], 100, new_tokens=8)
        # The wave is seen as it is fetched (96 unread, more than the worker can hold),
        # and the controller leans toward throughput while it lasts (a longer window).
        await eventually(lambda: serving.stats.window_changes["lag_high"] > 0, 60)
    finally:
        await serving.stop()


async def test_a_partition_handed_back_counts_none_of_its_new_owners_reads_as_unread(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    """How far a worker read a partition goes stale while another member owns it: kept, the
    other member's reads would count as this worker's backlog once the partition came back,
    and the controller would lean toward throughput with nothing to read."""
    bootstrap, lane = worker_config.bootstrap, worker_config.topics.requests[0]
    first, later = 1, 3  # records per partition: for the worker, then for the other member
    serving = Worker(worker_config, loaded_model)
    await serving.start()
    try:
        for tp in await topic_partitions(bootstrap, lane):
            await publish_small(bootstrap, lane, first, partition=tp.partition)
        assert await wait_for_lag_zero(bootstrap, worker_config.group_id, (lane,), 60) == 0
        assert serving.ingest.unread() == 0

        # Another member takes some of the lane, reads on past the worker, and leaves.
        member = await joined_member(bootstrap, worker_config.topics, worker_config.group_id)
        taken = member.assignment()
        for tp in taken:
            await publish_small(bootstrap, lane, later, partition=tp.partition)
        read, deadline = 0, time.monotonic() + 30
        while read < later * len(taken):
            assert time.monotonic() < deadline, f"the other member read only {read} records"
            read += sum(len(r) for r in (await member.getmany(timeout_ms=200)).values())
        await member.commit()
        await member.stop()

        # The worker has them back and has fetched from them (each fetch brings the
        # partition's end offset), with nothing left to read.
        consumer = serving._consumer
        await eventually(lambda: taken <= consumer.assignment() and all(
            consumer.highwater(tp) == first + later for tp in taken), 60)
        assert serving.ingest.unread() == 0
    finally:
        await serving.stop()


async def test_producer_policies_under_lag(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    topics = worker_config.topics
    await publish_small(worker_config.bootstrap, topics.requests[0], 20)

    def client(policy: AdmissionPolicy) -> StreamprocClient:
        return StreamprocClient(worker_config.bootstrap, request_topic=topics.requests[0],
                                reply_topic=topics.responses, admission=policy,
                                group_id=worker_config.group_id, status_topic=topics.status)

    # No worker yet: 20 jobs of lag and no throughput, so the drain time is unknown.
    async with client(AdmissionPolicy("reject", max_drain_s=5)) as rejecting:
        with pytest.raises(OverloadedError) as caught:
            await rejecting.submit("hi")
        assert caught.value.retry_after_s == 5
    async with client(AdmissionPolicy("shed", 5, timeout_s=0.5, shed_below_priority=1)) as shed:
        with pytest.raises(OverloadedError):
            await shed.submit("low", priority=0)
    async with client(AdmissionPolicy("block", max_drain_s=5, timeout_s=120)) as blocking:
        waiting = asyncio.create_task(blocking.submit(
            "blocked", params=wire.GenerationParams(max_new_tokens=3)))
        await asyncio.sleep(1.5)
        assert not waiting.done()  # still held back: nothing can drain the lane yet
        serving = Worker(worker_config, loaded_model)
        await serving.start()
        try:
            stream = await asyncio.wait_for(waiting, 120)
            result = await asyncio.wait_for(stream.result(), 60)
        finally:
            await serving.stop()
    assert result.usage.completion_tokens == 3
