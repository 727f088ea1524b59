"""The lag monitor: reads a group's offsets and its workers' status from the broker.

Each :meth:`LagMonitor.sample` gives, per partition of every request lane, the
log-end offset, the committed offset, the lag, the age of the oldest record
not yet committed and an estimated drain time, plus the group's health judged
over the last few samples (see :func:`streamproc.flow.lag.group_status`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from streamproc import kafka, wire
from streamproc.config import KafkaSecurity, TopicNames
from streamproc.flow.lag import (
    GroupSample,
    PartitionLag,
    Status,
    Throughput,
    drain_time_s,
    group_status,
)

T = TypeVar("T")
STATUS_FRESH_S = 10.0
"""A worker whose last status is older than this is not counted as serving."""
_STATUS_TAIL = 256


@dataclass(frozen=True)
class LagReport:
    group_id: str
    at: float
    partitions: list[PartitionLag]
    throughput: Throughput
    members: int
    status: Status

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def drain_s(self) -> float:
        return drain_time_s(self.lag, self.throughput)

    def lane_drain_s(self, topic: str) -> float:
        return drain_time_s(sum(p.lag for p in self.partitions if p.topic == topic),
                            self.throughput)

    def to_json(self) -> dict[str, Any]:
        """For ``streamproc lag --json``: infinities become null."""
        return {
            "group": self.group_id, "at": self.at, "status": self.status,
            "members": self.members, "lag": self.lag, "drain_s": _finite(self.drain_s),
            "tokens_per_s": self.throughput.tokens_per_s, "workers": self.throughput.workers,
            "partitions": [
                {"topic": p.topic, "partition": p.partition, "end_offset": p.end_offset,
                 "committed": p.committed, "lag": p.lag, "oldest_age_s": p.oldest_age_s,
                 "drain_s": _finite(p.drain_s)}
                for p in self.partitions],
        }


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


class LagMonitor:
    """Owns an admin client and a consumer (outside any group) for reading offsets."""

    def __init__(self, bootstrap: str, group_id: str, topics: TopicNames,
                 window: int = 5, security: KafkaSecurity | None = None) -> None:
        self.group_id = group_id
        self._topics = topics
        self._admin = kafka.admin(bootstrap, security)
        self._reader = kafka.consumer(bootstrap, security=security, group_id=None)
        self._samples: deque[GroupSample] = deque(maxlen=window)
        self._partitions: list[TopicPartition] = []
        self.last: LagReport | None = None

    async def start(self) -> None:
        """Connect; raises (having closed what it opened) if the broker cannot be reached."""
        try:
            await self._admin.start()
            await self._reader.start()
            self._partitions = await self._lane_partitions()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self._reader.stop()
        await self._admin.close()

    async def sample(self) -> LagReport:
        committed = await _retrying(
            lambda: self._admin.list_consumer_group_offsets(self.group_id))
        ends = await self._reader.end_offsets(self._partitions)
        members = await self._members()
        throughput = await self._throughput()
        now = time.time()
        partitions = []
        for tp in self._partitions:
            done = committed[tp].offset if tp in committed else None
            lag = max(0, ends[tp] - (done or 0))
            age = await self._oldest_age(tp, done or 0, now) if lag else 0.0
            partitions.append(PartitionLag(tp.topic, tp.partition, ends[tp], done, age,
                                           drain_time_s(lag, throughput)))
        total_committed = sum(p.committed or 0 for p in partitions)
        lag_total = sum(p.lag for p in partitions)
        self._samples.append(GroupSample(now, lag_total, total_committed, members))
        self.last = LagReport(self.group_id, now, partitions, throughput, members,
                              group_status(list(self._samples)))
        return self.last

    async def _lane_partitions(self) -> list[TopicPartition]:
        described = await self._admin.describe_topics(list(self._topics.requests))
        return [TopicPartition(t["topic"], p["partition"]) for t in described
                for p in sorted(t["partitions"], key=lambda p: p["partition"])]

    async def _members(self) -> int:
        described = await _retrying(
            lambda: self._admin.describe_consumer_groups([self.group_id]))
        for response in described:
            for group in response.to_object()["groups"]:
                if group["group"] == self.group_id:
                    return len(group["members"])
        return 0

    async def _oldest_age(self, tp: TopicPartition, offset: int, now: float) -> float:
        """Age of the record at ``offset``: the oldest one the group has not committed."""
        self._reader.assign([tp])
        self._reader.seek(tp, offset)
        fetched = await self._reader.getmany(tp, timeout_ms=1000, max_records=1)
        records = fetched.get(tp, [])
        return max(0.0, now - records[0].timestamp / 1000) if records else 0.0

    async def _throughput(self) -> Throughput:
        latest = await self._latest_statuses()
        now = time.time()
        live = [s for s in latest.values()
                if s.group_id == self.group_id and now - s.at <= STATUS_FRESH_S]
        rate = sum(s.tokens_per_s for s in live)
        weights = [s for s in live if s.avg_tokens_per_request > 0]
        avg = (sum(s.avg_tokens_per_request for s in weights) / len(weights)) if weights else 0.0
        return Throughput(rate, avg, len(live))

    async def _latest_statuses(self) -> dict[str, wire.WorkerStatus]:
        described = await self._admin.describe_topics([self._topics.status])
        tps = [TopicPartition(self._topics.status, p["partition"])
               for t in described for p in t["partitions"]]
        if not tps:
            return {}
        ends = await self._reader.end_offsets(tps)
        self._reader.assign(tps)
        for tp in tps:
            self._reader.seek(tp, max(0, ends[tp] - _STATUS_TAIL))
        latest: dict[str, wire.WorkerStatus] = {}
        remaining = sum(min(ends[tp], _STATUS_TAIL) for tp in tps)
        while remaining > 0:
            fetched = await self._reader.getmany(timeout_ms=500)
            if not fetched:
                break
            for records in fetched.values():
                remaining -= len(records)
                for record in records:
                    _keep_latest(latest, record.value)
        return latest


async def _retrying(call: Callable[[], Awaitable[T]], attempts: int = 20) -> T:
    """Retry errors Kafka marks retriable (a coordinator still being elected, say)."""
    for attempt in range(attempts):
        try:
            return await call()
        except KafkaError as exc:
            if not exc.retriable or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError("unreachable")


def _keep_latest(latest: dict[str, wire.WorkerStatus], value: bytes | None) -> None:
    try:
        status = wire.status_decoder.decode(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    known = latest.get(status.worker_id)
    if known is None or status.at >= known.at:
        latest[status.worker_id] = status
