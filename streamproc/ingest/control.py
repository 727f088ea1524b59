"""The control topic: cancellations, read by every worker.

Every worker reads every partition outside any consumer group, because the
request a cancellation names may be waiting or running on any of them. A
cancellation is remembered for ``REMEMBER_S`` from when it was published, so a request
it names is answered ``cancelled`` the moment it is read. A worker that starts reads the
control topic back that far first: a cancellation published while its request waited in
Kafka, or while the worker that held it was being replaced, still counts.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamproc import wire

log = logging.getLogger(__name__)
REMEMBER_S = 3600.0
"""As long as the control topic keeps records (its ``retention.ms`` in topics/)."""
REMEMBER_MAX = 100_000


class CancelledIds:
    """Recently cancelled request ids, bounded in count and age (wall-clock seconds from
    when each cancellation was published)."""

    def __init__(self, max_ids: int = REMEMBER_MAX, max_age_s: float = REMEMBER_S) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._max_ids = max_ids
        self._max_age_s = max_age_s

    def add(self, request_id: str, at: float | None = None) -> None:
        self._ids[request_id] = time.time() if at is None else at
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._max_ids:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        at = self._ids.get(request_id) if isinstance(request_id, str) else None
        return at is not None and time.time() - at <= self._max_age_s


class ControlListener:
    def __init__(self, consumer: AIOKafkaConsumer, topic: str,
                 on_cancel: Callable[[str, float], object], *,
                 lookback_s: float = REMEMBER_S) -> None:
        self._consumer = consumer
        self._topic = topic
        self._on_cancel = on_cancel
        self._lookback_s = lookback_s

    async def start(self, partitions: set[int]) -> None:
        """Read from ``lookback_s`` ago: older cancellations are no longer remembered."""
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        since_ms = int((time.time() - self._lookback_s) * 1000)
        found = await self._consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            if at is None:  # nothing that recent
                await self._consumer.seek_to_end(tp)
            else:
                self._consumer.seek(tp, at.offset)
            await self._consumer.position(tp)
        await self._catch_up(tps)

    async def _catch_up(self, tps: list[TopicPartition]) -> None:
        """Take in what was published before now, before the worker reads any request: a
        request cancelled while it waited in Kafka must not start generating first."""
        ends = await self._consumer.end_offsets(tps)
        while [tp for tp in tps if await self._consumer.position(tp) < ends[tp]]:
            await self._take(await self._consumer.getmany(*tps, timeout_ms=1000))

    async def stop(self) -> None:
        await self._consumer.stop()

    async def run(self) -> None:
        while True:
            await self._take(await self._consumer.getmany(timeout_ms=1000))

    async def _take(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        for records in fetched.values():
            for record in records:
                self._handle(record.value, record.timestamp / 1000)

    def _handle(self, value: bytes | None, published_at: float) -> None:
        try:
            cancel = wire.cancel_decoder.decode(value or b"")
        except Exception as exc:  # malformed, too deep, anything: one record must not stop us
            log.warning("ignoring a malformed control message: %s", exc)
            return
        self._on_cancel(cancel.request_id, published_at)
