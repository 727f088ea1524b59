"""Committing offsets, serialized with revocation and bounded in time.

aiokafka retries a commit through a broker outage, and sends each retry under the group's
*current* generation: a commit computed before a rebalance could land after it and move
the group's offset backwards, below what the partition's next owner already committed
(and a partition with nothing more to read is then never committed again). So a commit
and a revocation never overlap — a revocation waits for the commit under way, which
gives up after ``timeout_s`` (cancelled: it is not retried later) — and a commit result
is recorded only for the assignment it was computed under (:class:`Ledger` epochs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import TopicPartition

from streamproc import kafka
from streamproc.flow.ledger import Ledger

log = logging.getLogger(__name__)


class Committing(Protocol):
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


class Committer:
    def __init__(self, consumer: Committing, ledger: Ledger, timeout_s: float,
                 on_committed: Callable[[dict[TopicPartition, int]], None] = lambda _: None
                 ) -> None:
        self._consumer, self._ledger, self._timeout_s = consumer, ledger, timeout_s
        self._on_committed = on_committed
        self._lock = asyncio.Lock()

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit every watermark that advanced (of ``only``, if given)."""
        async with self._lock:
            await self._commit(only)

    async def revoke(self, partitions: set[TopicPartition],
                     flush: Callable[[], Awaitable[object]]) -> None:
        """``partitions`` leave this worker: once any commit under way has ended, flush
        what was published, commit their watermarks, forget them — all within
        ``timeout_s`` (what is not committed is served again by their next owner)."""
        async with self._lock:
            await kafka.steps_within((
                ("rebalance: flushing published messages", flush),
                ("rebalance: committing offsets", lambda: self._commit(partitions)),
            ), self._timeout_s)
            self._ledger.revoke(partitions)

    async def _commit(self, only: set[TopicPartition] | None) -> None:
        planned = self._ledger.committable(only)
        if not planned:
            return
        offsets = {tp: offset for tp, (offset, _) in planned.items()}
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation of a stopping worker's commit loop, which then never ends.
            async with asyncio.timeout(self._timeout_s):
                await self._consumer.commit(offsets)
        except TimeoutError:
            log.warning("commit of %d partitions gave up after %.1fs; retried at the next",
                        len(offsets), self._timeout_s)
            return
        except (CommitFailedError, KafkaError) as exc:
            # The group moved on (rebalance); the new owner re-reads from the last commit.
            log.warning("commit of %d partitions failed: %s", len(offsets), exc)
            return
        self._ledger.committed(planned)
        self._on_committed(offsets)
