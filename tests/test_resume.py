"""Resume, don't replay: a request taken over continues from what its readers hold.

The replacement worker runs a *different* model (other random weights), so a replay from
the prompt could never produce what these tests expect: the first worker's tokens up to
the takeover, then exactly the second model's greedy continuation of prompt + those
tokens. Every stream is read twice: through the Python client, and raw, by a reader that
applies only the rule docs/wire-schema.md states.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from streamproc import kafka, wire
from streamproc.client import Result, StreamprocClient
from streamproc.config import TopicNames, WorkerConfig
from streamproc.engine.loader import LoadedModel, load_model
from streamproc.engine.tiny import make_tiny_model
from streamproc.errors import WorkerStalledError
from streamproc.flow.ledger import Ticket
from streamproc.ingest.attempts import AttemptLog
from streamproc.worker.liveness import Liveness

from .helpers import read_topic, reference_tokens
from .processes import WorkerProcess, client_for, gather_then_stop, write_topics_file

pytestmark = [pytest.mark.kafka, pytest.mark.model]
MAX_NEW = 40
Raw = dict[str, Any]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model: the same tokenizer, other random weights."""
    return make_tiny_model(tmp_path_factory.mktemp("other-tiny-model"), seed=1)


@pytest.fixture(scope="module")
def other_model(other_model_dir: Path) -> LoadedModel:
    return load_model(str(other_model_dir), "cpu")


def by_the_rule(messages: list[Raw]) -> tuple[list[int], str, Raw | None]:
    """docs/wire-schema.md's reader rule, and nothing else: follow the first message's
    attempt, switch at a takeover, skip other attempts, stop at the first terminal."""
    attempt, tokens, text = None, [], ""
    for message in messages:
        if message["type"] == "takeover":
            attempt = message["attempt"]
            continue
        attempt = message["attempt"] if attempt is None else attempt
        if message["attempt"] != attempt:
            continue
        if message["type"] == "chunk":
            tokens += message["token_ids"]
            text += message["text"]
        elif message["type"] in ("final", "error"):
            return tokens, text, message
    return tokens, text, None


async def raw_streams(config: WorkerConfig) -> dict[str, list[Raw]]:
    """Every request's messages in log order, as plain JSON (no streamproc code)."""
    streams: dict[str, list[Raw]] = defaultdict(list)
    for value in await read_topic(config.bootstrap, config.topics.responses):
        message = json.loads(value)
        streams[message["request_id"]].append(message)
    return streams


def held_at_takeover(messages: list[Raw]) -> list[int] | None:
    """What readers held when the last takeover came, if one came before the end."""
    takeovers = [i for i, m in enumerate(messages) if m["type"] == "takeover"]
    if not takeovers:
        return None
    tokens, _, end = by_the_rule(messages[:takeovers[-1]])
    return None if end is not None else tokens


async def submit(client: StreamprocClient, count: int, mid_stream: dict[str, int] | None = None
                 ) -> tuple[list[str], list[asyncio.Task[Result]], asyncio.Event]:
    """``count`` greedy jobs; the event is set once 4 streams began. ``mid_stream``, if
    given, holds the tokens received so far of each stream begun and not yet ended."""
    prompts = [f"resume {i}: " + "kafka streams " * (i % 5) for i in range(count)]
    under_way = asyncio.Event()
    started: set[str] = set()
    progress = mid_stream if mid_stream is not None else {}

    async def follow(stream: Any) -> Result:
        async for chunk in stream:
            started.add(stream.request_id)
            progress[stream.request_id] = progress.get(stream.request_id, 0) + len(
                chunk.token_ids)
            if len(started) >= 4:
                under_way.set()
        progress.pop(stream.request_id, None)
        result: Result = await stream.result()
        return result

    params = wire.GenerationParams(max_new_tokens=MAX_NEW)
    streams = [await client.submit(p, params=params) for p in prompts]
    return prompts, [asyncio.create_task(follow(s)) for s in streams], under_way


def assert_resumed(first: LoadedModel, second: LoadedModel, prompts: list[str],
                   results: list[Result], raw: dict[str, list[Raw]]) -> int:
    """Each stream is one model's greedy output, or the first model's up to a takeover
    and the second's continuation from there; returns how many were resumed mid-stream
    into something a replay could not give."""
    diverged = 0
    for prompt, result in zip(prompts, results, strict=True):
        messages = raw[result.request_id]
        tokens, text, end = by_the_rule(messages)
        assert (tokens, text) == (result.token_ids, result.text), result.request_id
        assert end is not None
        assert end["type"] == "final"
        assert result.usage.completion_tokens == len(result.token_ids)
        ids = first.tokenizer(prompt).input_ids
        held = held_at_takeover(messages)
        if held is None:
            assert result.token_ids in (reference_tokens(first, ids, MAX_NEW),
                                        reference_tokens(second, ids, MAX_NEW))
            continue
        ours = reference_tokens(first, ids, MAX_NEW)
        assert held == ours[:len(held)], "what was held is the first model's"
        expected = held + reference_tokens(second, ids + held, MAX_NEW - len(held))
        assert result.token_ids == expected, result.request_id
        diverged += bool(held) and expected != ours
    print(f"{diverged} of {len(results)} streams resumed mid-way into another model's "
          "continuation")
    return diverged




async def test_after_kill_9_a_worker_with_another_model_continues_every_stream(
        worker_config: WorkerConfig, loaded_model: LoadedModel, other_model_dir: Path,
        other_model: LoadedModel, tmp_path: Path) -> None:
    topics_dir = write_topics_file(tmp_path / "topics", worker_config.topics)
    first = WorkerProcess(worker_config, topics_dir, tmp_path / "first.log",
                          "--max-batch-size", "8")
    second = WorkerProcess(worker_config, topics_dir, tmp_path / "second.log",
                           "--model", str(other_model_dir))
    await first.start()
    async with client_for(worker_config) as client:
        prompts, tasks, under_way = await submit(client, 48)
        await asyncio.wait_for(under_way.wait(), 60)
        assert first.process is not None
        first.process.kill()
        await first.process.wait()
        assert sum(not t.done() for t in tasks) > 0, "the kill came too late to matter"
        await second.start()
        results = await gather_then_stop(worker_config, tasks, second)
    raw = await raw_streams(worker_config)
    assert assert_resumed(loaded_model, other_model, prompts, results, raw) > 0, \
        "no stream was taken over mid-way"
    assert "took over" in second.log.read_text()


async def test_a_worker_frozen_past_its_session_timeout_cannot_split_a_stream(
        worker_config: WorkerConfig, loaded_model: LoadedModel, other_model_dir: Path,
        other_model: LoadedModel, tmp_path: Path) -> None:
    """SIGSTOP a worker mid-stream until the group gives its partitions away, then wake it:
    its requests continue on the other worker, and the woken one exits without a word
    more (exit code 9), whatever it had in flight."""
    topics_dir = write_topics_file(tmp_path / "topics", worker_config.topics)
    frozen = WorkerProcess(worker_config, topics_dir, tmp_path / "frozen.log",
                           "--max-batch-size", "4")
    other = WorkerProcess(worker_config, topics_dir, tmp_path / "other.log",
                          "--model", str(other_model_dir), "--max-batch-size", "4")
    await frozen.start()
    await other.start()
    assert frozen.process is not None
    async with client_for(worker_config) as client:
        mid_stream: dict[str, int] = {}
        prompts, tasks, _ = await submit(client, 96, mid_stream)
        # Frozen the moment a stream of its own is half-way.
        lane = worker_config.topics.requests[0]
        await asyncio.wait_for(half_way_on(frozen.log, lane, mid_stream), 60)
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            await wait_for_text(other.log, "took over", 60)
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
        assert await asyncio.wait_for(frozen.process.wait(), 60) == 9
        results = await gather_then_stop(worker_config, tasks, other)
    assert "stood still" in frozen.log.read_text()
    raw = await raw_streams(worker_config)
    assert assert_resumed(loaded_model, other_model, prompts, results, raw) > 0


def owned(log: Path, topic: str) -> set[int]:
    """The partitions of ``topic`` a worker process was last assigned, from its log."""
    lines = [line for line in log.read_text().splitlines() if "partitions assigned" in line]
    return {int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", lines[-1])}


async def half_way_on(log: Path, topic: str, mid_stream: dict[str, int]) -> None:
    """Until a stream that the worker logging to ``log`` serves has tokens and no end."""
    partitions = list(range(4))  # as processes.write_topics_file declares them
    while True:
        mine = owned(log, topic)
        if any(count > 0 and DefaultPartitioner()(rid.encode(), partitions, partitions) in mine
               for rid, count in list(mid_stream.items())):
            return
        await asyncio.sleep(0.002)


def said(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


async def wait_for_text(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not said(log, text):
        assert time.monotonic() < deadline, f"{log.name} never said {text!r}"
        await asyncio.sleep(0.2)


async def test_a_takeover_reads_back_every_stream_it_claims_past_other_traffic(
        bootstrap: str) -> None:
    """The cost probe's own path (make bench-takeover), small: 8 requests claimed at once,
    each found holding its 10 published tokens behind other requests' messages."""
    from streamproc.devtools.bench.takeover import one_takeover

    result = await one_takeover(bootstrap, filler=200)
    assert result["takeovers"] == 8
    assert result["records_read"] >= 8 * 10 + 200


def test_a_worker_whose_loop_stood_still_past_the_limit_may_never_publish_again() -> None:
    liveness = Liveness(limit_s=0.2)
    liveness.check()
    time.sleep(0.3)  # the event loop frozen: nothing ran
    with pytest.raises(WorkerStalledError, match="stood still"):
        liveness.check()
    with pytest.raises(WorkerStalledError):  # for good, not once
        liveness.check()
    assert liveness.tripped


async def test_a_records_mark_goes_only_after_its_offset_is_committed(
        bootstrap: str, topic_names: TopicNames) -> None:
    """A worker that lost its partitions without knowing yet cannot commit, so it cannot
    erase the mark its record's next owner relies on: the tombstone waits for a commit."""
    producer = kafka.producer(bootstrap)
    await producer.start()
    log = AttemptLog(kafka.consumer(bootstrap, group_id=None), producer, topic_names.attempts)
    tp = TopicPartition(topic_names.requests[0], 0)
    ticket = Ticket(tp, 5, 0)
    try:
        log.admitted(ticket, 0)
        await log.durable(ticket)
        log.done(ticket)
        log.committed({tp: 5})  # not past it yet
        await log.stop()
        assert [v is None for v in await read_topic(bootstrap, topic_names.attempts)] == [False]
        assert log.started(ticket) is not None
        log.committed({tp: 6})
        await log.stop()
    finally:
        await producer.stop()
    marks = await read_topic(bootstrap, topic_names.attempts, until_count=2)
    assert [v is None for v in marks] == [False, True]
    assert log.started(ticket) is None
