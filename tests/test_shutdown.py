"""SIGTERM mid-stream, start again: every request still completes, exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamproc import wire
from streamproc.client import Result, ResultStream, StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.engine.loader import LoadedModel

from .helpers import reference_tokens, wait_for_lag_zero
from .processes import WorkerProcess, write_topics_file

pytestmark = [pytest.mark.kafka, pytest.mark.model]
REQUESTS = 24
MAX_NEW_TOKENS = 300


async def consume(stream: ResultStream, first_chunk: asyncio.Event) -> Result:
    async for _ in stream:
        first_chunk.set()
    return await stream.result()


async def test_sigterm_mid_stream_then_restart_completes_every_request(
        worker_config: WorkerConfig, loaded_model: LoadedModel, tmp_path: Path) -> None:
    topics_dir = write_topics_file(tmp_path / "topics", worker_config.topics)
    # A small batch and a short drain: some requests finish during shutdown, some are
    # cut off mid-stream, some never started; all of them must complete after restart.
    options = ("--max-batch-size", "8", "--max-inflight", "16", "--drain-timeout", "0.3")
    first = WorkerProcess(worker_config, topics_dir, tmp_path / "first.log", *options)
    await first.start()
    async with StreamprocClient(worker_config.bootstrap,
                                request_topic=worker_config.topics.requests[0],
                                reply_topic=worker_config.topics.responses) as client:
        params = wire.GenerationParams(max_new_tokens=MAX_NEW_TOKENS)
        prompts = [f"request {i}: " + "tokens " * (i % 7) for i in range(REQUESTS)]
        streams = [await client.submit(p, params=params) for p in prompts]
        started = asyncio.Event()
        tasks = [asyncio.create_task(consume(s, started)) for s in streams]
        await asyncio.wait_for(started.wait(), 60)

        assert await first.terminate() == 0
        unfinished = sum(not t.done() for t in tasks)
        assert unfinished > 0, "the first worker finished everything before SIGTERM"
        assert "handing them back" in first.log.read_text()

        second = WorkerProcess(worker_config, topics_dir, tmp_path / "second.log", *options)
        await second.start()
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks), 180)
        finally:
            assert await second.terminate() == 0

    assert len({r.request_id for r in results}) == REQUESTS
    for result in results:  # nothing doubled or dropped where a stream was taken over
        assert result.usage.completion_tokens == len(result.token_ids)
        assert result.finish_reason in ("length", "stop")
    tokenizer = loaded_model.tokenizer
    for prompt, result in list(zip(prompts, results, strict=True))[:6]:
        expected = reference_tokens(loaded_model, tokenizer(prompt).input_ids, MAX_NEW_TOKENS)
        assert result.token_ids == expected, "a taken-over stream was continued wrongly"
    lag = await wait_for_lag_zero(worker_config.bootstrap, worker_config.group_id,
                                  worker_config.topics.requests)
    assert lag == 0
