"""Taking a request over from an attempt that started it: resume, don't replay.

A record whose attempts entry says a worker started it (:mod:`streamproc.ingest.attempts`)
may already have chunks on its reply topic. Generating it again from its prompt would
splice a second continuation onto the first wherever the two differ (a GPU's results
change with the batch a row shares; the model or the release may differ between the
workers). Instead its new owner

1. publishes a ``takeover`` message for its new attempt into the request's reply
   partition. Readers follow that attempt from there on (:mod:`streamproc.follow`), so
   whatever the old owner writes after it, if it still runs, is ignored;
2. reads that partition from just before the record was first started up to its own
   takeover message, applying the reader rule: what it ends with is exactly what every
   reader holds at the takeover;
3. continues from there: prompt + those tokens are prefilled, and the stream's ``seq``
   and offsets carry on (or, if the stream had already ended, nothing more is sent).

Takeovers that one fetch brings are claimed together and each reply partition is read
once for all of them. Steady state pays nothing here: only records with an entry are
taken over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamproc import wire
from streamproc.channel import Job
from streamproc.follow import Follower
from streamproc.metrics.stats import WorkerStats
from streamproc.publish.publisher import Publisher

log = logging.getLogger(__name__)
SCAN_SLACK_S = 10.0
"""How far before a record's first start the scan begins: room for the clocks of the
worker that wrote the mark and of the broker (with ``LogAppendTime`` topics) to differ."""


@dataclass(frozen=True)
class Claim:
    """One request taken over: its takeover message landed at ``marker`` in ``tp``."""

    job: Job
    since: float
    tp: TopicPartition
    marker: int
    follower: Follower


class Resumer:
    def __init__(self, consumer: AIOKafkaConsumer, publisher: Publisher,
                 stats: WorkerStats) -> None:
        self._consumer, self._publisher, self._stats = consumer, publisher, stats

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def take_over(self, jobs: list[tuple[Job, float]]) -> list[Claim]:
        """Claim each ``(job, first started at)`` and learn what its readers hold."""
        began = time.monotonic()
        claims = await asyncio.gather(*(self._claim(job, since) for job, since in jobs))
        by_tp: dict[TopicPartition, list[Claim]] = defaultdict(list)
        for claim in claims:
            by_tp[claim.tp].append(claim)
        scanned = 0
        for tp, group in by_tp.items():
            scanned += await self._scan(tp, group)
        took = time.monotonic() - began
        self._stats.takeovers += len(claims)
        self._stats.takeover_records_read += scanned
        self._stats.takeover_seconds += took
        log.info("took over %d requests: read %d reply records in %.3fs", len(claims),
                 scanned, took)
        return claims

    async def _claim(self, job: Job, since: float) -> Claim:
        tp, marker = await self._publisher.takeover(job.reply_topic, job.request_id,
                                                    job.attempt)
        return Claim(job, since, tp, marker, Follower(job.request_id))

    async def _scan(self, tp: TopicPartition, claims: list[Claim]) -> int:
        """Feed each claim's follower with its request's messages before its marker."""
        by_key: dict[bytes, list[Claim]] = defaultdict(list)
        for claim in claims:
            by_key[claim.job.request_id.encode()].append(claim)
        end = max(c.marker for c in claims)
        self._consumer.assign([tp])
        self._consumer.seek(tp, await self._start_offset(tp, min(c.since for c in claims)))
        scanned = 0
        while await self._consumer.position(tp) <= end:
            fetched = await self._consumer.getmany(tp, timeout_ms=1000)
            for record in fetched.get(tp, []):
                if record.offset > end:
                    break
                scanned += 1
                for claim in by_key.get(record.key or b"", ()):
                    if record.offset < claim.marker:
                        _feed(claim.follower, record.value)
        return scanned

    async def _start_offset(self, tp: TopicPartition, since: float) -> int:
        found = await self._consumer.offsets_for_times(
            {tp: max(0, int((since - SCAN_SLACK_S) * 1000))})
        if found.get(tp) is not None:
            return int(found[tp].offset)
        return int((await self._consumer.beginning_offsets([tp]))[tp])


def _feed(follower: Follower, value: bytes | None) -> None:
    with suppress(msgspec.DecodeError, msgspec.ValidationError):  # not ours: skipped
        follower.take(wire.response_decoder.decode(value or b""))
