"""Duplicate jobs: a producer's retry writes the same job twice (same key, same request
id); the reader sees one stream with one terminal message, and the duplicate is counted,
not served."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import TopicPartition

from streamproc import kafka, wire
from streamproc.flow.recent import RecentRequests
from streamproc.worker.app import Worker

from .helpers import eventually

TP = TopicPartition("lane", 0)


def test_another_offset_is_a_duplicate_the_same_offset_read_again_is_not() -> None:
    recent = RecentRequests(max_ids=3)
    assert recent.duplicate_of(TP, "a", 5) is None
    assert recent.duplicate_of(TP, "a", 5) is None  # the partition given back: read again
    assert recent.duplicate_of(TP, "a", 9) == 5
    assert recent.duplicate_of(TopicPartition("lane", 1), "a", 9) is None  # another key
    for rid in ("b", "c", "d"):
        recent.duplicate_of(TP, rid, 1)
    assert recent.duplicate_of(TP, "a", 12) is None  # bounded: the oldest forgotten


def test_the_same_id_submitted_again_later_is_a_new_job_not_a_retry() -> None:
    recent = RecentRequests()
    assert recent.duplicate_of(TP, "line-1", 5, 1000.0) is None
    assert recent.duplicate_of(TP, "line-1", 6, 1000.0) == 5  # the same bytes: a retry
    assert recent.duplicate_of(TP, "line-1", 7, 2000.0) is None  # a batch run again


@pytest.mark.kafka
@pytest.mark.model
async def test_a_job_written_twice_streams_once(worker: Worker) -> None:
    config = worker.config
    rid = f"twice-{uuid.uuid4().hex[:8]}"
    job = wire.encode(wire.GenerationRequest(request_id=rid, prompt="say it once",
                                             params=wire.GenerationParams(max_new_tokens=5)))
    producer = kafka.producer(config.bootstrap)
    reader = kafka.consumer(config.bootstrap, group_id=None)
    await producer.start()
    await reader.start()
    try:
        replies = [TopicPartition(config.topics.responses, p)
                   for p in await producer.partitions_for(config.topics.responses)]
        reader.assign(replies)
        await reader.seek_to_beginning(*replies)
        lane = config.topics.requests[-1]
        for _ in range(2):  # the producer's retry, as the broker sees it
            await producer.send_and_wait(lane, job, key=rid.encode())
        await eventually(lambda: worker.stats.duplicates == 1)
        messages: list[wire.ResponseMessage] = []

        async def read_more() -> None:
            for records in (await reader.getmany(timeout_ms=500)).values():
                messages.extend(wire.response_decoder.decode(r.value) for r in records
                                if r.key == rid.encode())

        async def until_terminal() -> None:
            while not any(wire.is_terminal(m) for m in messages):
                await read_more()
        await asyncio.wait_for(until_terminal(), 60)
        await asyncio.sleep(1.0)  # a second stream would have started by now
        await read_more()
    finally:
        await producer.stop()
        await reader.stop()
    seqs = [m.seq for m in messages if not isinstance(m, wire.Takeover)]
    assert seqs == list(range(len(messages)))  # one stream, in order, no takeover
    assert sum(wire.is_terminal(m) for m in messages) == 1
    assert len({m.attempt for m in messages}) == 1
    assert worker.stats.outcomes["length"] + worker.stats.outcomes["stop"] == 1
