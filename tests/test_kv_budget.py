"""KV memory as the admission budget: the running batch never outgrows it, a request that
could never fit is refused when read, output is unchanged under it, and a step that runs
out of memory anyway reruns its requests in a smaller batch instead of failing them."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from streamproc import wire
from streamproc.admission.policy import FixedWindowPolicy
from streamproc.channel import WaitingQueue
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.errors import ConfigError, GenerationError
from streamproc.flow.kv_budget import KvBudget, kv_bytes_per_token
from streamproc.metrics.stats import WorkerStats
from streamproc.worker.app import Worker, device_kv_bytes
from streamproc.worker.runner import is_out_of_memory
from streamproc.worker.serving import ServingLoop

from .helpers import reference_tokens
from .test_engine import prepared, run_to_completion, tokens
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


async def test_an_out_of_memory_step_reruns_its_requests_from_where_they_stood() -> None:
    """Nothing fails: the running requests go again, each continuing its stream, in a
    batch half as big."""
    runner = ScriptedRunner(oom_steps={4})
    publisher, waiting, stats = RecordingPublisher(), WaitingQueue(), WorkerStats()
    serving = ServingLoop(runner, waiting, FixedWindowPolicy(8, 10_000, 0.0), publisher,
                          stats)
    await serving.start()
    task = asyncio.create_task(serving.run())
    try:
        jobs = [f"o{i}" for i in range(8)]
        for rid in jobs:
            waiting.put(job(rid, 10))
        await publisher.until(lambda: set(jobs) <= publisher.ended)
        widest_before, runner.widest = runner.widest, 0
        for rid in ("p0", "p1", "p2", "p3", "p4", "p5"):  # later work: the smaller batch
            waiting.put(job(rid, 10))
        await publisher.until(lambda: {"p0", "p5"} <= publisher.ended)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not publisher.failures
    assert all(publisher.tokens(rid) == list(range(10)) for rid in jobs)
    assert stats.oom_retries == 8
    assert (widest_before, runner.widest) == (8, 4)


def test_out_of_memory_is_told_from_other_failures() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1024 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.model
def test_a_request_continued_twice_still_decodes_as_generate(
        loaded_model: LoadedModel) -> None:
    prompt = loaded_model.tokenizer("continued twice: kafka").input_ids
    expected = reference_tokens(loaded_model, prompt, 20)
    first = prepared("c", prompt, 20).continued(expected[:5], "")
    again = first.continued(expected[5:9], "")
    assert (again.kept_tokens, again.prompt_tokens, again.max_new_tokens) == (9, len(prompt), 11)
    events = run_to_completion(Engine(loaded_model), [[again]])
    assert expected[:9] + tokens(events["c"]) == expected


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


def test_on_a_gpu_the_budget_defaults_to_a_fraction_of_free_memory_after_the_prefix_cache(
        ) -> None:
    gib = 2**30
    config = WorkerConfig(prefix_cache_bytes=gib, kv_memory_fraction=0.5)
    assert device_kv_bytes(config, 9 * gib) == 4 * gib
    assert device_kv_bytes(config, 0) == 0  # a CPU says nothing is free: no bound
    assert device_kv_bytes(replace(config, kv_memory_bytes=123), 9 * gib) == 0  # set: kept
    assert device_kv_bytes(replace(config, kv_memory_fraction=0.0), 9 * gib) == 0
    with pytest.raises(ConfigError):
        replace(config, kv_memory_fraction=1.5)
