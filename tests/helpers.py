"""Reading topics and group offsets back from the broker, for assertions; writing raw
requests to it, as any producer could."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from aiokafka import TopicPartition

from streamproc import kafka, wire
from streamproc.engine.loader import LoadedModel


async def publish_requests(bootstrap: str, topic: str,
                           requests: Iterable[wire.GenerationRequest], *,
                           partition: int | None = None, **producer_options: Any) -> None:
    """Each request keyed by its id (or all to ``partition``), with a producer of our own."""
    producer = kafka.producer(bootstrap, **producer_options)
    await producer.start()
    try:
        for request in requests:
            await producer.send(topic, wire.encode(request), key=request.request_id.encode(),
                                partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, *, until_count: int = 0,
                     timeout_s: float = 20.0) -> list[bytes]:
    """Every value in ``topic`` from the start, once at least ``until_count`` are there."""
    consumer = kafka.consumer(bootstrap, group_id=None)
    await consumer.start()
    try:
        partitions = await topic_partitions(bootstrap, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200)
            values += [r.value for rs in fetched.values() for r in rs]
            if values and len(values) >= until_count and not fetched:
                break
        return values
    finally:
        await consumer.stop()


async def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    admin = kafka.admin(bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = sorted(p["partition"] for p in described["partitions"])
    assert found, f"topic {topic} not found"
    return [TopicPartition(topic, p) for p in found]


def streams_by_request(values: list[bytes]) -> dict[str, list[wire.ResponseMessage]]:
    streams: dict[str, list[wire.ResponseMessage]] = defaultdict(list)
    for value in values:
        message = wire.response_decoder.decode(value)
        streams[message.request_id].append(message)
    return streams


async def group_lag(bootstrap: str, group: str, topics: tuple[str, ...]) -> int:
    """End offsets minus the group's committed offsets, summed over ``topics``."""
    admin = kafka.admin(bootstrap)
    consumer = kafka.consumer(bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [tp for t in topics for tp in await topic_partitions(bootstrap, t)]
        ends = await consumer.end_offsets(tps)
        return sum(end - (committed[tp].offset if tp in committed else 0)
                   for tp, end in ends.items())
    finally:
        await admin.close()
        await consumer.stop()


async def wait_for_lag_zero(bootstrap: str, group: str, topics: tuple[str, ...],
                            timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    lag = await group_lag(bootstrap, group, topics)
    while lag and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        lag = await group_lag(bootstrap, group, topics)
    return lag


def reference_tokens(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """What ``model.generate()`` produces greedily for one prompt, alone, less the
    end-of-sequence token it stops at (a stream ends there but does not carry it)."""
    ids = torch.tensor([prompt_ids])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=loaded.pad_id)
    tokens: list[int] = out[0, len(prompt_ids):].tolist()
    if tokens and tokens[-1] in loaded.eos_ids:
        tokens.pop()
    return tokens


async def run_cli(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamproc", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for state another task changes on its own schedule (a refresh loop, say)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)
