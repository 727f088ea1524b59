"""The control topic: cancellations, read by every worker from the moment it starts.

Every worker reads every partition outside any consumer group, because the
request a cancellation names may be waiting or running on any of them. A
cancellation that arrives before its request is remembered for a while, so the
request is answered ``cancelled`` the moment it is read.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamproc import wire

log = logging.getLogger(__name__)
REMEMBER_S = 600.0
REMEMBER_MAX = 100_000


class CancelledIds:
    """Recently cancelled request ids, bounded in count and age."""

    def __init__(self, max_ids: int = REMEMBER_MAX, max_age_s: float = REMEMBER_S) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._max_ids = max_ids
        self._max_age_s = max_age_s

    def add(self, request_id: str, now: float | None = None) -> None:
        self._ids[request_id] = time.monotonic() if now is None else now
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._max_ids:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object, now: float | None = None) -> bool:
        at = self._ids.get(request_id) if isinstance(request_id, str) else None
        if at is None:
            return False
        return (time.monotonic() if now is None else now) - at <= self._max_age_s


class ControlListener:
    def __init__(self, consumer: AIOKafkaConsumer, topic: str,
                 on_cancel: Callable[[str], object]) -> None:
        self._consumer = consumer
        self._topic = topic
        self._on_cancel = on_cancel

    async def start(self, partitions: set[int]) -> None:
        """Read from the end: older cancellations concern requests long finished."""
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def run(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=1000)
            for records in fetched.values():
                for record in records:
                    self._handle(record.value)

    def _handle(self, value: bytes | None) -> None:
        try:
            cancel = wire.cancel_decoder.decode(value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring a malformed control message: %s", exc)
            return
        self._on_cancel(cancel.request_id)
