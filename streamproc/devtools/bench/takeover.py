"""What resuming costs: ``python -m streamproc.devtools.bench.takeover`` (``make bench-takeover``).

Steady state: a burst of chat jobs through a worker on the real model; every stream's first
message waits for its record's attempts mark. Reported: that wait per stream against the
jobs' time to first token, measured in the same run.

Per takeover: a reply partition holding ``filler`` messages of other requests published
since the taken-over request started; a worker takes 8 requests over and reads the
partition back. Reported: the time that takes and the records read, per filler size.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from contextlib import ExitStack

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from streamproc import kafka, topics, wire
from streamproc.channel import Job
from streamproc.cli.common import run
from streamproc.cli.demo_cmd import local_broker
from streamproc.client import StreamprocClient
from streamproc.config import DEFAULT_MODEL, TopicNames, WorkerConfig, bootstrap_from_env
from streamproc.engine import catalog
from streamproc.engine.loader import describe_model
from streamproc.engine.sequence import PreparedRequest
from streamproc.flow.ledger import Ticket
from streamproc.ingest.resume import Resumer
from streamproc.metrics.stats import WorkerStats, percentile
from streamproc.publish.publisher import Publisher
from streamproc.worker.app import Worker

QUESTIONS = ["What is Kafka?", "Name three colours.", "Why is the sky blue?",
             "Write a haiku about queues.", "What does a GPU do?", "Count to five."]


async def fresh_topics(bootstrap: str) -> TopicNames:
    specs = topics.suffixed(topics.load_specs(), uuid.uuid4().hex[:8], replication_factor=1)
    await topics.apply(bootstrap, specs)
    return topics.topic_names(specs)


async def steady_state(bootstrap: str, model: str, jobs: int) -> dict[str, float]:
    names = await fresh_topics(bootstrap)
    config = WorkerConfig(bootstrap=bootstrap, topics=names, model=model,
                          group_id=f"takeover-bench-{uuid.uuid4().hex[:6]}")
    worker = Worker(config, describe_model(model, "auto"))
    await worker.start()
    try:
        async with StreamprocClient(bootstrap, request_topic=names.requests[0],
                                    reply_topic=names.responses) as client:
            params = wire.GenerationParams(max_new_tokens=24)
            streams = [await client.submit([wire.ChatMessage("user", QUESTIONS[i % 6])],
                                           params=params) for i in range(jobs)]
            results = await asyncio.gather(*(s.result() for s in streams))
    finally:
        await worker.stop()
    stats = worker.stats
    ttft = sorted(r.client_ttft_s for r in results)
    wait = stats.mark_wait_seconds / max(1, stats.streams_opened)
    return {"jobs": jobs, "mark_wait_ms_per_stream": wait * 1000,
            "ttft_p50_ms": percentile(ttft, 50) * 1000,
            "mark_wait_vs_ttft_p50": wait / percentile(ttft, 50)}


async def one_takeover(bootstrap: str, filler: int, requests: int = 8) -> dict[str, float]:
    """``requests`` taken over at once, each reply partition they use holding ``filler``
    messages of another request since they started."""
    names = await fresh_topics(bootstrap)
    producer = kafka.producer(bootstrap, linger_ms=5)
    await producer.start()
    stats = WorkerStats()
    resumer = Resumer(kafka.consumer(bootstrap, group_id=None),
                      Publisher(producer, names.dead_letter, lambda _: None,
                                lambda _t, _e: None), stats)
    await resumer.start()
    try:
        since = time.time()
        jobs = [_job(f"taken-{i}", names.responses) for i in range(requests)]
        used = set()
        for job in jobs:  # what the first owner published
            used.add(await _publish(producer, names.responses, job.request_id, 10))
        for partition in used:
            await _publish(producer, names.responses, "someone-else", filler, partition)
        await producer.flush()
        began = time.perf_counter()
        claims = await resumer.take_over([(job, since) for job in jobs])
        took = time.perf_counter() - began
    finally:
        await resumer.stop()
        await producer.stop()
    assert all(len(c.follower.tokens) == 10 for c in claims)
    return {"filler": filler, "takeovers": requests, "seconds": took,
            "records_read": stats.takeover_records_read}


def _job(request_id: str, reply_topic: str) -> Job:
    request = wire.GenerationRequest(request_id=request_id, prompt="-")
    ticket = Ticket(TopicPartition("requests", 0), 0, 0)
    return Job(PreparedRequest(request, [1], 8, time.time()), ticket, reply_topic)


async def _publish(producer: AIOKafkaProducer, topic: str, request_id: str, count: int,
                   partition: int | None = None) -> int:
    """``count`` chunks of ``request_id`` (on its own partition unless one is given)."""
    if partition is None:
        partitions = sorted(await producer.partitions_for(topic))
        partition = int(DefaultPartitioner()(request_id.encode(), partitions, partitions))
    for i in range(count):
        chunk = wire.TokenChunk(request_id, i, "x", [7], "first", i, i)
        await producer.send(topic, wire.encode(chunk), key=request_id.encode(),
                            partition=partition)
    return partition


async def measure(bootstrap: str, model: str, jobs: int, fillers: list[int]) -> None:
    steady = await steady_state(bootstrap, model, jobs)
    print(f"steady state, {jobs} chat jobs on {model}: the first message waited "
          f"{steady['mark_wait_ms_per_stream']:.3f} ms per stream for its mark; TTFT p50 "
          f"{steady['ttft_p50_ms']:.0f} ms (ratio {steady['mark_wait_vs_ttft_p50']:.4f})")
    for filler in fillers:
        result = await one_takeover(bootstrap, filler)
        print(f"takeover of 8 requests, {filler} other messages on each of their "
              f"partitions: read {result['records_read']:.0f} records in "
              f"{result['seconds'] * 1000:.0f} ms")


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamproc.devtools.bench.takeover",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="a broker (default: a local one, started here)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--fillers", default="0,10000,100000",
                        help="comma-separated counts of other messages on the partition")
    args = parser.parse_args(argv)
    with ExitStack() as cleanup:
        bootstrap = args.bootstrap or bootstrap_from_env() or local_broker(cleanup, _say)
        model = catalog.resolve(args.model)
        run(measure(bootstrap, model, args.jobs, [int(f) for f in args.fillers.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
