"""Cancellation through the control topic: running, waiting, and not yet read."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from streamproc import wire
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.worker.app import Worker

from .helpers import eventually

pytestmark = [pytest.mark.kafka, pytest.mark.model]
LONG = wire.GenerationParams(max_new_tokens=1000, ignore_eos=True)


async def test_running_waiting_and_unread_requests_are_cancelled(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    config = replace(worker_config, max_batch_size=1, max_inflight=8)
    worker = Worker(config, loaded_model)
    await worker.start()
    try:
        async with StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                                    reply_topic=config.topics.responses,
                                    control_topic=config.topics.control) as client:
            running = await client.submit("runs long", params=LONG)
            async for _ in running:  # running: it has produced a token
                break
            waiting = await client.submit("waits behind it", params=LONG)  # batch size 1
            await eventually(lambda: len(worker.waiting) == 1)
            await client.cancel(waiting.request_id)
            await client.cancel(running.request_id)
            stopped = await asyncio.wait_for(running.result(), 30)
            never_ran = await asyncio.wait_for(waiting.result(), 30)

            await client.cancel("not-yet-submitted")
            await eventually(lambda: "not-yet-submitted" in worker.cancelled)
            early = await asyncio.wait_for(client.generate(
                "too late", params=LONG, request_id="not-yet-submitted"), 30)
            served = await asyncio.wait_for(client.generate(
                "still serving", params=wire.GenerationParams(max_new_tokens=3)), 30)
    finally:
        await worker.stop()
    assert stopped.finish_reason == "cancelled"
    assert 1 <= stopped.usage.completion_tokens < 1000
    assert len(stopped.token_ids) == stopped.usage.completion_tokens
    assert (never_ran.finish_reason, never_ran.usage.completion_tokens) == ("cancelled", 0)
    assert (early.finish_reason, early.usage.completion_tokens) == ("cancelled", 0)
    assert served.usage.completion_tokens == 3
    assert worker.stats.outcomes["cancelled"] == 3


async def test_a_cancel_published_before_any_worker_started_still_cancels(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    """The request waits in Kafka and is cancelled there (no worker runs: a takeover in
    progress, or a scaled-down group); the worker that starts afterwards never runs it."""
    config = worker_config
    async with StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                                reply_topic=config.topics.responses,
                                control_topic=config.topics.control) as client:
        doomed = await client.submit("cancelled while it waited", params=LONG)
        kept = await client.submit("served", params=wire.GenerationParams(max_new_tokens=3))
        await client.cancel(doomed.request_id)
        worker = Worker(config, loaded_model)
        await worker.start()
        try:
            cancelled = await asyncio.wait_for(doomed.result(), 60)
            served = await asyncio.wait_for(kept.result(), 60)
        finally:
            await worker.stop()
    assert (cancelled.finish_reason, cancelled.usage.completion_tokens) == ("cancelled", 0)
    assert served.usage.completion_tokens == 3
