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
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import islice

from aiokafka import TopicPartition

from streamproc.engine.sequence import PreparedRequest
from streamproc.flow.ledger import Ticket


@dataclass(frozen=True)
class Job:
    """A prepared request and where it came from, so its offset can be committed."""

    prepared: PreparedRequest
    ticket: Ticket
    """Its record, under the assignment it was read in."""
    reply_topic: str
    enqueued_at: float = field(default_factory=time.monotonic)
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """This processing of the record; a redelivery after a crash gets a new one."""
    deaths: int = 0
    """How many times a worker died while this record ran in its engine (the attempts
    topic)."""
    alone: bool = False
    """Runs alone in the engine: one more death makes it poison, and its batch-mates must
    not be counted with it (see :mod:`streamproc.ingest.attempts`)."""

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def tp(self) -> TopicPartition:
        return self.ticket.tp

    @property
    def offset(self) -> int:
        return self.ticket.offset

    @property
    def key(self) -> tuple[TopicPartition, int]:
        """Unique per record, unlike ``request_id``, which a producer may reuse."""
        return (self.tp, self.offset)


class WaitingQueue:
    """Jobs read from Kafka and waiting for admission, one FIFO per priority lane.

    Rank 0 is the highest lane; :meth:`take` and :meth:`prompt_tokens` go
    highest lane first, so a higher lane's jobs are always admitted first.
    """

    def __init__(self, lanes: int = 1) -> None:
        self._lanes: list[deque[Job]] = [deque() for _ in range(lanes)]
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    def by_rank(self) -> list[int]:
        return [len(lane) for lane in self._lanes]

    def put(self, job: Job, rank: int = 0) -> None:
        self._lanes[rank].append(job)
        self._arrived.set()

    def put_front(self, jobs: list[Job]) -> None:
        """``jobs`` first of all, in this order (they were running: an out-of-memory step
        put them back)."""
        self._lanes[0].extendleft(reversed(jobs))
        self._arrived.set()

    def take(self, count: int, running: int = 0,
             fits: Callable[[list[Job], Job], bool] | None = None) -> list[Job]:
        """Up to ``count`` jobs from the head, highest lane first, stopping at the first
        that does not ``fits`` beside those taken. A job that must run alone
        (:attr:`Job.alone`) is taken only by itself, into an empty engine (``running``
        0): jobs behind it wait until it is done."""
        taken: list[Job] = []
        for lane in self._lanes:
            while lane and len(taken) < count:
                if fits is not None and not fits(taken, lane[0]):
                    return taken
                if lane[0].alone:
                    if not taken and not running:
                        taken.append(lane.popleft())
                    return taken
                taken.append(lane.popleft())
        return taken

    def prompt_tokens(self, limit: int | None = None) -> list[int]:
        """Prompt lengths in admission order: the first ``limit`` (all when None)."""
        heads = (job for lane in self._lanes for job in lane)
        return [len(job.prepared.prompt_ids) for job in islice(heads, limit)]

    def oldest_wait_s(self, now: float) -> float:
        heads = [lane[0].enqueued_at for lane in self._lanes if lane]
        return now - min(heads) if heads else 0.0

    def drop(self, partitions: set[TopicPartition] | None = None) -> list[Job]:
        """Remove the jobs of ``partitions`` (all when None): they go back to Kafka."""
        return self.remove(lambda j: partitions is None or j.tp in partitions)

    def remove(self, which: Callable[[Job], bool]) -> list[Job]:
        removed = [j for lane in self._lanes for j in lane if which(j)]
        for i, lane in enumerate(self._lanes):
            self._lanes[i] = deque(j for j in lane if not which(j))
        return removed

    def wake(self) -> None:
        """End a pending :meth:`wait_for_arrival` early (e.g. to start draining)."""
        self._arrived.set()

    async def wait_for_arrival(self, wait_s: float | None) -> None:
        """Until a job arrives, :meth:`wake` is called, or ``wait_s`` passes."""
        self._arrived.clear()
        if len(self) and wait_s is None:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), wait_s)
