"""KV memory as the admission budget: the running batch never outgrows it, a request that
could never fit is refused when read, and output is unchanged under it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from streamproc import wire
from streamproc.admission.policy import FixedWindowPolicy
from streamproc.channel import WaitingQueue
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.errors import GenerationError
from streamproc.flow.kv_budget import KvBudget, kv_bytes_per_token
from streamproc.metrics.stats import WorkerStats
from streamproc.worker.app import Worker
from streamproc.worker.serving import ServingLoop

from .helpers import reference_tokens
from .test_serving_loop import RecordingPublisher, ScriptedRunner, job


def test_the_budget_is_rows_times_the_widest_span() -> None:
    budget = KvBudget.of(budget_bytes=60 * 1000, bytes_per_token=1000)
    assert budget.tokens == 60
    assert budget.fits([20, 20, 20])
    assert not budget.fits([20, 20, 20, 20])
    assert not budget.fits([10, 10, 45])  # right-aligned: three rows as wide as 45
    assert budget.fits([500])  # one alone always may (wider ones are refused when read)
    assert not KvBudget.of(0, 1000).bounded
    assert kv_bytes_per_token(30, 3, 64, 4) == 46_080  # SmolLM2-135M in fp32


async def test_admission_waits_for_room_and_every_job_still_ends() -> None:
    runner, publisher, waiting = ScriptedRunner(), RecordingPublisher(), WaitingQueue()
    serving = ServingLoop(runner, waiting, FixedWindowPolicy(16, 10_000, 0.0), publisher,
                          WorkerStats(), kv_budget=KvBudget(60))
    await serving.start()
    task = asyncio.create_task(serving.run())
    try:
        jobs = {f"r{i}": 18 for i in range(9)}  # span 2 + 18 = 20: three fit at once
        for rid, new in jobs.items():
            waiting.put(job(rid, new))
        await publisher.until(lambda: set(jobs) <= publisher.ended)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert runner.widest == 3
    assert all(publisher.tokens(rid) == list(range(18)) for rid in jobs)


@pytest.mark.kafka
@pytest.mark.model
async def test_a_worker_with_a_small_kv_budget_serves_exactly_and_refuses_what_cannot_fit(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    per_token = loaded_model.kv_bytes_per_token
    assert per_token > 0
    config = replace(worker_config, kv_memory_bytes=100 * per_token)
    worker = Worker(config, loaded_model)
    await worker.start()
    try:
        async with StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                                    reply_topic=config.topics.responses) as client:
            prompts = [f"budget {i}: kafka" for i in range(6)]
            params = wire.GenerationParams(max_new_tokens=24)
            streams = [await client.submit(p, params=params) for p in prompts]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)),
                                             60)
            with pytest.raises(GenerationError, match="KV memory"):
                await asyncio.wait_for(client.generate(
                    "too wide", params=wire.GenerationParams(max_new_tokens=120)), 30)
    finally:
        await worker.stop()
    for prompt, result in zip(prompts, results, strict=True):
        ids = loaded_model.tokenizer(prompt).input_ids
        assert result.token_ids == reference_tokens(loaded_model, ids, 24)
