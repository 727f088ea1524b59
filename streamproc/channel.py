"""The unit of work that moves between stages, and the queue in front of the engine.

The queue is bounded by the ingest stage: it stops fetching (pauses its
partitions) once the worker holds ``max_inflight`` records, so the backlog
stays in Kafka instead of in this process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from streamproc.engine.sequence import PreparedRequest


@dataclass(frozen=True)
class Job:
    """A prepared request and where it came from, so its offset can be committed."""

    prepared: PreparedRequest
    tp: TopicPartition
    offset: int
    reply_topic: str
    enqueued_at: float = field(default_factory=time.monotonic)
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """This processing of the record; a redelivery after a crash gets a new one."""

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def key(self) -> tuple[TopicPartition, int]:
        """Unique per record, unlike ``request_id``, which a producer may reuse."""
        return (self.tp, self.offset)


class WaitingQueue:
    """Jobs read from Kafka and waiting for admission into the running batch."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        self._jobs.append(job)
        self._arrived.set()

    def take(self, count: int) -> list[Job]:
        return [self._jobs.popleft() for _ in range(min(count, len(self._jobs)))]

    def prompt_tokens(self) -> list[int]:
        return [len(job.prepared.prompt_ids) for job in self._jobs]

    def oldest_wait_s(self, now: float) -> float:
        return now - self._jobs[0].enqueued_at if self._jobs else 0.0

    def drop(self, partitions: set[TopicPartition] | None = None) -> list[Job]:
        """Remove the jobs of ``partitions`` (all when None): they go back to Kafka."""
        dropped = [j for j in self._jobs if partitions is None or j.tp in partitions]
        self._jobs = deque(j for j in self._jobs if j not in dropped)
        return dropped

    def wake(self) -> None:
        """End a pending :meth:`wait_for_arrival` early (e.g. to start draining)."""
        self._arrived.set()

    async def wait_for_arrival(self, wait_s: float | None) -> None:
        """Until a job arrives, :meth:`wake` is called, or ``wait_s`` passes."""
        self._arrived.clear()
        if self._jobs and wait_s is None:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), wait_s)
