"""The whole path on a real broker: client → requests topic → worker → reply topic."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from dataclasses import replace

import pytest
import torch

from streamproc import kafka, wire
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.errors import EngineError, GenerationError
from streamproc.worker.app import Worker
from streamproc.worker.engine_process import EngineProcess

from .helpers import read_topic, reference_tokens, streams_by_request, wait_for_lag_zero

pytestmark = [pytest.mark.kafka, pytest.mark.model]


def random_prompt(rng: random.Random) -> str:
    words = ["kafka", "token", "stream", "lag", "batch", "the", "GPU", "queue", "order", "ok"]
    return " ".join(rng.choice(words) for _ in range(rng.randrange(1, 40)))


def client_for(config: WorkerConfig) -> StreamprocClient:
    return StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                            reply_topic=config.topics.responses)


async def test_fifty_concurrent_requests_stream_complete_and_commit(
        worker: Worker, worker_config: WorkerConfig) -> None:
    rng = random.Random(1)
    async with client_for(worker_config) as client:
        streams = [await client.submit(random_prompt(rng), params=wire.GenerationParams(
            max_new_tokens=rng.randrange(1, 24))) for _ in range(50)]
        results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 120)
    assert len({r.request_id for r in results}) == 50
    assert all(r.finish_reason in ("length", "stop") for r in results)

    raw = streams_by_request(await read_topic(
        worker_config.bootstrap, worker_config.topics.responses, until_count=50))
    assert set(raw) == {s.request_id for s in streams}
    for request_id, messages in raw.items():
        seqs = [m.seq for m in messages if not isinstance(m, wire.Takeover)]
        assert seqs == list(range(len(messages))), request_id  # and no takeover
        assert [wire.is_terminal(m) for m in messages] == [False] * (len(messages) - 1) + [True]
        assert isinstance(messages[-1], wire.FinalMessage)

    lag = await wait_for_lag_zero(worker_config.bootstrap, worker_config.group_id,
                                  worker_config.topics.requests)
    assert lag == 0
    assert worker.ledger.requests == 0


async def test_greedy_results_through_kafka_equal_generate(
        worker: Worker, worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    assert worker.config.engine_process  # the default: the engine in a process of its own
    await assert_greedy_results_equal_generate(worker_config, loaded_model)


async def test_greedy_results_equal_generate_with_the_engine_on_a_thread(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    config = replace(worker_config, engine_process=False)
    worker = Worker(config, loaded_model)
    await worker.start()
    try:
        await assert_greedy_results_equal_generate(config, loaded_model)
    finally:
        await worker.stop()


async def assert_greedy_results_equal_generate(config: WorkerConfig,
                                               loaded_model: LoadedModel) -> None:
    rng = random.Random(2)
    prompts = [random_prompt(rng) for _ in range(16)]
    budgets = [rng.randrange(1, 32) for _ in prompts]
    async with client_for(config) as client:
        streams = [await client.submit(p, params=wire.GenerationParams(max_new_tokens=n))
                   for p, n in zip(prompts, budgets, strict=True)]
        results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 120)
    tokenizer = loaded_model.tokenizer
    for prompt, budget, result in zip(prompts, budgets, results, strict=True):
        ids = tokenizer(prompt).input_ids
        assert result.token_ids == reference_tokens(loaded_model, ids, budget), prompt
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


async def test_prompts_prefilled_in_chunks_through_kafka_equal_generate(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    """A worker whose chunks are 16 tokens: most of these prompts take several steps."""
    config = replace(worker_config, prefill_chunk_tokens=16)
    rng = random.Random(5)
    prompts = [random_prompt(rng) for _ in range(12)]
    tokenizer = loaded_model.tokenizer
    assert sum(len(tokenizer(p).input_ids) > 16 for p in prompts) >= 6
    worker = Worker(config, loaded_model)
    await worker.start()
    try:
        async with client_for(config) as client:
            streams = [await client.submit(p, params=wire.GenerationParams(max_new_tokens=12))
                       for p in prompts]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)),
                                             120)
    finally:
        await worker.stop()
    for prompt, result in zip(prompts, results, strict=True):
        ids = tokenizer(prompt).input_ids
        assert result.token_ids == reference_tokens(loaded_model, ids, 12), prompt


async def publish_raw(bootstrap: str, topic: str, *values: bytes) -> None:
    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"raw")
    finally:
        await producer.stop()


async def test_bad_input_lands_where_it_should_and_the_worker_keeps_serving(
        worker: Worker, worker_config: WorkerConfig) -> None:
    topics = worker_config.topics
    malformed, wrong_type = b"{not json", b'{"request_id": "w", "prompt": 17}'
    await publish_raw(worker_config.bootstrap, topics.requests[0], malformed, wrong_type)
    async with client_for(worker_config) as client:
        failures = {
            "invalid_params": wire.GenerationParams(max_new_tokens=-1),
            "prompt_too_long": wire.GenerationParams(max_new_tokens=1000),
        }
        for code, params in failures.items():
            with pytest.raises(GenerationError) as caught:
                await asyncio.wait_for(client.generate("hello world " * 100, params=params), 30)
            assert caught.value.code == code
        negative = wire.GenerationParams(temperature=-0.5)
        with pytest.raises(GenerationError, match="temperature"):
            await asyncio.wait_for(client.generate("hi", params=negative), 30)
        # NaN has no JSON form (it is sent as null): the schema check fails, and the
        # producer still hears back because the request names itself.
        not_a_number = wire.GenerationParams(temperature=float("nan"))
        with pytest.raises(GenerationError) as caught:
            await asyncio.wait_for(client.generate("hi", params=not_a_number), 30)
        assert caught.value.code == "invalid_request"
        rogue = wire.GenerationRequest(request_id="rogue", prompt="hi",
                                       reply_topic="__consumer_offsets")
        await publish_raw(worker_config.bootstrap, topics.requests[0], wire.encode(rogue))
        served = await asyncio.wait_for(client.generate(
            "still serving?", params=wire.GenerationParams(max_new_tokens=3)), 30)
    assert served.usage.completion_tokens == 3

    letters = [wire.dead_letter_decoder.decode(v) for v in await read_topic(
        worker_config.bootstrap, topics.dead_letter, until_count=4)]
    by_original = {letter.original: letter for letter in letters}
    assert by_original[malformed].reason == "malformed_json"
    assert by_original[wrong_type].reason == "invalid_schema"
    assert "Expected `str" in by_original[wrong_type].detail
    assert by_original[malformed].offset + 1 == by_original[wrong_type].offset
    assert [x.reason for x in letters].count("invalid_schema") == 2  # wrong type, NaN
    [rogue_letter] = [x for x in letters if x.reason == "unknown_reply_topic"]
    assert rogue_letter.topic == topics.requests[0]

    replies = streams_by_request(await read_topic(worker_config.bootstrap, topics.responses))
    [rogue_reply] = replies["rogue"]
    assert isinstance(rogue_reply, wire.ErrorMessage)
    assert rogue_reply.code == "unknown_reply_topic"
    lag = await wait_for_lag_zero(worker_config.bootstrap, worker_config.group_id,
                                  topics.requests)
    assert lag == 0


async def run_coalescing(config: WorkerConfig, loaded_model: LoadedModel
                         ) -> list[wire.TokenChunk]:
    """Twelve 40-token streams through a worker; every chunk they produced."""
    running = Worker(config, loaded_model)
    await running.start()
    prompts = [f"coalesce {i} " * (i + 1) for i in range(12)]
    params = wire.GenerationParams(max_new_tokens=40, ignore_eos=True)
    try:
        async with client_for(config) as client:
            streams = [await client.submit(p, params=params) for p in prompts]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 60)
    finally:
        await running.stop()
    tokenizer = loaded_model.tokenizer
    for prompt, result in zip(prompts, results, strict=True):
        ids = tokenizer(prompt).input_ids
        expected = reference_tokens(loaded_model, ids, 40)
        # ignore_eos may run past an EOS that generate() would stop at: compare the prefix.
        assert result.token_ids[:len(expected)] == expected
        assert len(result.token_ids) == 40
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    raw = streams_by_request(await read_topic(config.bootstrap, config.topics.responses,
                                              until_count=12))
    return [m for msgs in raw.values() for m in msgs if isinstance(m, wire.TokenChunk)]


async def test_chunks_coalesce_when_kafka_is_behind_and_the_first_token_never_waits(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    # A 200 ms linger keeps every chunk unacknowledged for longer than many engine steps:
    # Kafka is "behind" every stream, so tokens made meanwhile must be merged.
    chunks = await run_coalescing(replace(worker_config, linger_ms=200), loaded_model)
    firsts = [m for m in chunks if m.seq == 0]
    assert len(firsts) == 12
    assert all(len(m.token_ids) == 1 for m in firsts)  # the first token went out alone
    assert len(chunks) < 12 * 40 / 4  # later tokens were merged, several per chunk


async def test_a_chunk_budget_spaces_each_streams_chunks_even_when_kafka_keeps_up(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    # Acknowledgements come back at once (no linger), but 1.2 chunks/s over 12 streams
    # asks for 10 s between a stream's chunks, held to half the 10 s inter-token target:
    # 5 s, longer than the whole run. So each stream sends its first token alone, then
    # everything else with its end.
    config = replace(worker_config, linger_ms=0, chunk_rate=1.2, itl_target_ms=10_000.0)
    chunks = await run_coalescing(config, loaded_model)
    per_stream = Counter(m.request_id for m in chunks)
    assert len(per_stream) == 12
    assert max(per_stream.values()) <= 3
    assert all(len(m.token_ids) == 1 for m in chunks if m.seq == 0)


async def test_without_coalescing_every_token_is_its_own_chunk(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    chunks = await run_coalescing(replace(worker_config, linger_ms=200, coalesce=False),
                                  loaded_model)
    assert len(chunks) == 12 * 40
    assert all(len(m.token_ids) == 1 for m in chunks)


async def test_a_worker_stopped_right_after_start_sizes_torchs_pool_and_closes_its_clients(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    """Stopped while its lag monitor may still be connecting: an unclosed client would
    fail the test (warnings are errors). With the engine on its thread, the worker's own
    process runs the kernels and sizes torch's pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    worker = Worker(replace(worker_config, cpu_threads=1, engine_process=False),
                    loaded_model)
    try:
        await worker.start()
        assert torch.get_num_threads() == 1
    finally:
        await worker.stop()
        torch.set_num_threads(before)


async def test_a_worker_whose_engine_process_dies_fails_and_stops_cleanly(
        worker: Worker, worker_config: WorkerConfig) -> None:
    async with client_for(worker_config) as client:
        stream = await client.submit("kafka lag", params=wire.GenerationParams(
            max_new_tokens=500, ignore_eos=True))
        await asyncio.wait_for(anext(aiter(stream)), 30)  # the engine is serving it
        engine = worker.serving._engine
        assert isinstance(engine, EngineProcess)
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="ended while serving"):
            await asyncio.wait_for(worker.wait_failed(), 30)
    # Not committed: the request is served again by whoever reads the partition next.
    assert worker.ledger.requests == 1
