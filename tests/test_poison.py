"""A record that kills the engine process every time it runs must not stop the group: the
count of deaths survives each crash in Kafka (the attempts topic), and after
``poison_attempts`` of them the record is dead-lettered with an error reply while every
other job, its batch-mates included, is served. Real broker, real worker processes, a
test-only hook that makes one prompt kill the engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from streamproc import kafka, topics, wire
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.errors import GenerationError
from streamproc.worker.engine_process import CRASH_MARKER_ENV

from .processes import WorkerProcess, write_topics_file

pytestmark = [pytest.mark.kafka, pytest.mark.model]
MARKER = "crash-the-engine-now"
POISON_ATTEMPTS = 3


async def dead_letters(config: WorkerConfig) -> list[wire.DeadLetter]:
    reader = kafka.consumer(config.bootstrap, group_id=None)
    await reader.start()
    try:
        tp = TopicPartition(config.topics.dead_letter, 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        fetched = await reader.getmany(tp, timeout_ms=2000)
        return [wire.dead_letter_decoder.decode(r.value) for r in fetched.get(tp, [])]
    finally:
        await reader.stop()


async def test_a_record_that_kills_the_engine_is_dead_lettered_and_the_group_goes_on(
        bootstrap: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    specs = topics.suffixed(topics.load_specs(), suffix)
    await topics.apply(bootstrap, specs)
    config = WorkerConfig(bootstrap=bootstrap, topics=topics.topic_names(specs),
                          model=str(tiny_model_dir), group_id=f"poison-{suffix}")
    assert config.topics.attempts
    topics_dir = write_topics_file(tmp_path / "topics", config.topics)
    params = wire.GenerationParams(max_new_tokens=3)
    async with StreamprocClient(bootstrap, request_topic=config.topics.requests[0],
                                reply_topic=config.topics.responses,
                                control_topic=config.topics.control) as client:
        poison = await client.submit(f"please {MARKER}", params=params)
        fine = [await client.submit(f"an innocent batch-mate {i}", params=params)
                for i in range(3)]
        arrived = time.monotonic()
        answer = asyncio.ensure_future(poison.result())
        deaths, worker = 0, None
        while not answer.done():
            worker = WorkerProcess(config, topics_dir, tmp_path / f"worker-{deaths}.log",
                                   "--poison-attempts", str(POISON_ATTEMPTS),
                                   env={CRASH_MARKER_ENV: MARKER})
            await worker.start()
            assert worker.process is not None
            exited = asyncio.ensure_future(worker.process.wait())
            await asyncio.wait({exited, answer}, timeout=120,
                               return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                assert exited.result() == 1, worker.log.read_text()[-2000:]
                deaths += 1
                assert deaths <= POISON_ATTEMPTS, "the poison record was served again"
            else:
                exited.cancel()
        dead_lettered_after_s = time.monotonic() - arrived
        with pytest.raises(GenerationError) as refused:
            answer.result()
        served = [await asyncio.wait_for(f.result(), 60) for f in fine]
    assert worker is not None
    assert worker.process is not None
    assert worker.process.returncode is None  # the last worker lives on past the record
    await worker.terminate()
    assert deaths == POISON_ATTEMPTS
    assert refused.value.code == "poison"
    assert [r.usage.completion_tokens for r in served] == [3, 3, 3]
    [letter] = [x for x in await dead_letters(config) if x.reason == "poison"]
    assert MARKER.encode() in letter.original
    print(f"poison record dead-lettered {dead_lettered_after_s:.1f}s after it arrived, "
          f"{deaths} worker deaths")
