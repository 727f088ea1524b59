"""Priority lanes: higher lanes are admitted first and their backlog holds lower ones back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from aiokafka import TopicPartition

from streamproc import wire
from streamproc.channel import Job, WaitingQueue
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.engine.sequence import PreparedRequest
from streamproc.flow.ledger import Ticket
from streamproc.flow.priority import lanes_to_pause
from streamproc.worker.app import Worker


def test_a_backlog_pauses_every_lower_lane() -> None:
    assert lanes_to_pause([0, 0, 0], backlog=4) == set()
    assert lanes_to_pause([5, 0, 9], backlog=4) == {1, 2}
    assert lanes_to_pause([3, 4, 9], backlog=4) == {2}
    assert lanes_to_pause([0, 0, 9], backlog=4) == set()


def job(rid: str, topic: str, prompt_ids: tuple[int, ...] = (1, 2)) -> Job:
    request = wire.GenerationRequest(request_id=rid, prompt="p")
    return Job(PreparedRequest(request, list(prompt_ids), 4, time.time()),
               Ticket(TopicPartition(topic, 0), 0, 1), "replies")


def test_the_queue_hands_out_higher_lanes_first() -> None:
    queue = WaitingQueue(lanes=2)
    queue.put(job("low-1", "low"), rank=1)
    queue.put(job("high-1", "high"), rank=0)
    queue.put(job("low-2", "low"), rank=1)
    queue.put(job("high-2", "high"), rank=0)
    assert queue.by_rank() == [2, 2]
    assert [j.request_id for j in queue.take(3)] == ["high-1", "high-2", "low-1"]
    assert [j.request_id for j in queue.drop({TopicPartition("low", 0)})] == ["low-2"]
    assert len(queue) == 0


def test_prompt_lengths_come_in_admission_order_up_to_a_limit() -> None:
    queue = WaitingQueue(lanes=2)
    queue.put(job("low", "low", (1, 2, 3)), rank=1)
    queue.put(job("high", "high", (1,)), rank=0)
    queue.put(job("high-2", "high", (1, 2)), rank=0)
    assert queue.prompt_tokens() == [1, 2, 3]
    assert queue.prompt_tokens(limit=2) == [1, 2]


@pytest.mark.kafka
@pytest.mark.model
async def test_the_high_lane_is_served_ahead_of_a_default_lane_backlog(
        worker_config: WorkerConfig, loaded_model: LoadedModel) -> None:
    high, default = worker_config.topics.requests
    params = wire.GenerationParams(max_new_tokens=16)
    order: list[str] = []

    async def finish(stream: object, lane: str) -> None:
        assert hasattr(stream, "result")
        await stream.result()
        order.append(lane)

    async with StreamprocClient(worker_config.bootstrap, request_topic=default,
                                reply_topic=worker_config.topics.responses) as client:
        # Both lanes back up before the worker starts; the default lane is filled first.
        lows = [await client.submit(f"low {i}", params=params, lane=default) for i in range(40)]
        highs = [await client.submit(f"high {i}", params=params, lane=high) for i in range(8)]
        config = replace(worker_config, max_batch_size=4, max_inflight=16, lane_backlog=2)
        worker = Worker(config, loaded_model)
        await worker.start()
        try:
            await asyncio.wait_for(asyncio.gather(
                *(finish(s, "high") for s in highs), *(finish(s, "low") for s in lows)), 120)
        finally:
            await worker.stop()
    last_high = max(i for i, lane in enumerate(order) if lane == "high")
    assert last_high < 8 + 16, f"high lane finished at position {last_high}: {order}"
