"""Building aiokafka clients from one place, so every client is set up alike."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from streamproc.config import KafkaSecurity

CLIENT_ID = "streamproc"
CLOSE_TIMEOUT_S = 10.0
"""Default time a client's shutdown (flush, commit, stop) may take with the broker gone."""
log = logging.getLogger(__name__)


def _base(bootstrap: str, security: KafkaSecurity | None) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap, "client_id": CLIENT_ID,
            **(security or KafkaSecurity()).client_options()}


def producer(bootstrap: str, security: KafkaSecurity | None = None,
             **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas.

    No linger by default: a message goes out as soon as the producer is free, and messages
    queued while a request is in flight still leave together. Waiting to fill batches
    bought no throughput here and cost the first token 1-2 ms at each hop."""
    options = {**_base(bootstrap, security), "acks": "all", "enable_idempotence": True,
               "linger_ms": 0, **overrides}
    return AIOKafkaProducer(**options)


def consumer(bootstrap: str, *topics: str, security: KafkaSecurity | None = None,
             **overrides: Any) -> AIOKafkaConsumer:
    options = {**_base(bootstrap, security), "enable_auto_commit": False,
               "auto_offset_reset": "earliest", **overrides}
    return AIOKafkaConsumer(*topics, **options)


def admin(bootstrap: str, security: KafkaSecurity | None = None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_base(bootstrap, security))


async def close_within(what: str, step: Awaitable[object], timeout_s: float) -> bool:
    """Await a shutdown ``step`` (a flush, a commit, a client's stop) for at most
    ``timeout_s``; False, with a warning, if it had to be given up.

    With the broker unreachable, aiokafka's producer waits forever for messages it cannot
    deliver (aiokafka issue 1101), and a consumer's stop can end in a CancelledError of its
    own fetch task (seen here, in its fetcher's close): neither may keep a process from
    exiting.
    """
    timeout_s = max(0.0, timeout_s)
    try:
        await asyncio.wait_for(step, timeout_s)
        return True
    except TimeoutError:
        log.warning("%s did not finish within %.1fs (is the broker reachable?); going on "
                    "without it", what, timeout_s)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller itself is being cancelled: not ours to swallow
        log.warning("%s was cut short inside the Kafka client (is the broker reachable?); "
                    "going on without it", what)
    return False


async def steps_within(steps: Iterable[tuple[str, Callable[[], Awaitable[object]]]],
                       timeout_s: float) -> None:
    """Run ``steps`` (what, step) in order, each through :func:`close_within`, with
    ``timeout_s`` for all of them together."""
    deadline = time.monotonic() + timeout_s
    for what, step in steps:
        await close_within(what, step(), deadline - time.monotonic())
