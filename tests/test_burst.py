"""A 5,000-request burst into a worker that cannot keep up: memory stays flat, nothing lost."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from streamproc import wire
from streamproc.config import WorkerConfig
from streamproc.metrics.lag_monitor import LagMonitor

from .helpers import publish_requests, read_topic
from .processes import WorkerProcess, write_topics_file

pytestmark = [pytest.mark.kafka, pytest.mark.model]
BURST = 5000
MAX_INFLIGHT = 64
RSS_GROWTH_BOUND_MB = 150
PROMPT = "backpressure keeps the backlog in kafka, not in the worker " * 8


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def publish_burst(config: WorkerConfig) -> None:
    # Every tenth job wants an answer within 2 s: once the backlog is deep, the worker
    # must refuse those at once rather than serve them late.
    await publish_requests(config.bootstrap, config.topics.requests[0], (
        wire.GenerationRequest(
            request_id=f"burst-{i}", prompt=f"{i} {PROMPT}",
            deadline=time.time() + 2 if i % 10 == 0 else None,
            params=wire.GenerationParams(max_new_tokens=4),
            reply_topic=config.topics.responses)
        for i in range(BURST)), linger_ms=20)


async def terminal_messages(config: WorkerConfig) -> dict[str, wire.ResponseMessage]:
    values = await read_topic(config.bootstrap, config.topics.responses, timeout_s=5)
    terminals = {}
    for value in values:
        message = wire.response_decoder.decode(value)
        if wire.is_terminal(message):
            assert message.request_id not in terminals, f"{message.request_id} ended twice"
            terminals[message.request_id] = message
    return terminals


async def test_burst_keeps_memory_bounded_and_loses_nothing(
        worker_config: WorkerConfig, tmp_path: Path) -> None:
    topics_dir = write_topics_file(tmp_path / "topics", worker_config.topics)
    worker = WorkerProcess(worker_config, topics_dir, tmp_path / "worker.log",
                           "--max-inflight", str(MAX_INFLIGHT), "--max-batch-size", "32")
    os.environ["STREAMPROC_STATUS_INTERVAL_S"] = "0.5"
    try:
        await worker.start()
    finally:
        del os.environ["STREAMPROC_STATUS_INTERVAL_S"]
    assert worker.process is not None
    baseline = rss_mb(worker.process.pid)
    monitor = LagMonitor(worker_config.bootstrap, worker_config.group_id, worker_config.topics)
    await monitor.start()
    peak_rss, peak_lag = baseline, 0
    try:
        await publish_burst(worker_config)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            report = await monitor.sample()
            peak_lag = max(peak_lag, report.lag)
            peak_rss = max(peak_rss, rss_mb(worker.process.pid))
            if report.lag == 0:
                break
            await asyncio.sleep(0.5)
        final_lag = (await monitor.sample()).lag
    finally:
        await monitor.stop()
        assert await worker.terminate() == 0

    print(f"\nburst: peak lag {peak_lag}, rss {baseline:.0f} -> {peak_rss:.0f} MB")
    assert peak_lag > 10 * MAX_INFLIGHT, "the burst should have backed up into Kafka"
    assert final_lag == 0
    assert peak_rss - baseline < RSS_GROWTH_BOUND_MB, (baseline, peak_rss)

    terminals = await terminal_messages(worker_config)
    assert len(terminals) == BURST  # every request answered, exactly once
    outcomes = {m.finish_reason for m in terminals.values() if isinstance(m, wire.FinalMessage)}
    assert all(isinstance(m, wire.FinalMessage) for m in terminals.values())
    assert outcomes <= {"stop", "length", "rejected", "expired"}
    rejected = [m for m in terminals.values()
                if isinstance(m, wire.FinalMessage) and m.finish_reason == "rejected"]
    print(f"burst: {len(rejected)} rejected up front, outcomes {outcomes}")
    assert rejected, "deep backlog: some 2-second deadlines must have been refused up front"
    assert all(m.detail == "overloaded" for m in rejected)

    statuses = [wire.status_decoder.decode(v) for v in await read_topic(
        worker_config.bootstrap, worker_config.topics.status, timeout_s=3)]
    assert max(s.held_requests for s in statuses) <= MAX_INFLIGHT
    assert any(s.paused for s in statuses)
    log = worker.log.read_text()
    assert log.count("partitions assigned") == 1, "the group rebalanced during the burst"
