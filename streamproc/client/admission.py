"""Applying a producer-side admission policy before a job is published.

The client looks at the lane's lag (a :class:`LagMonitor` sample, cached for
``refresh_s``) and lets the pure :func:`decide` say admit, wait or refuse.
"""

from __future__ import annotations

import asyncio
import time

from streamproc.config import KafkaSecurity, TopicNames
from streamproc.errors import OverloadedError
from streamproc.flow.admission import AdmissionPolicy, decide
from streamproc.metrics.lag_monitor import LagMonitor, LagReport


class AdmissionGate:
    def __init__(self, bootstrap: str, group_id: str, request_topic: str, status_topic: str,
                 policy: AdmissionPolicy, refresh_s: float = 1.0,
                 security: KafkaSecurity | None = None) -> None:
        self.policy = policy
        self._topic = request_topic
        self._monitor = LagMonitor(bootstrap, group_id,
                                   TopicNames(requests=(request_topic,), status=status_topic),
                                   security=security)
        self._refresh_s = refresh_s
        self._report: LagReport | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._monitor.start()

    async def stop(self) -> None:
        await self._monitor.stop()

    async def admit(self, priority: int) -> None:
        """Return when the job may be published; raise :class:`OverloadedError` otherwise."""
        give_up = time.monotonic() + self.policy.timeout_s
        while True:
            drain = (await self._current()).lane_drain_s(self._topic)
            decision = decide(self.policy, drain, priority)
            if decision.action == "admit":
                return
            if decision.action == "refuse" or time.monotonic() + self._refresh_s > give_up:
                raise OverloadedError(self._topic, drain, decision.retry_after_s)
            # The backlog lives in Kafka: looking again is the only way to see it shrink.
            await asyncio.sleep(self._refresh_s)

    async def _current(self) -> LagReport:
        async with self._lock:  # many submits at once share one look at the broker
            fresh = self._report is not None and time.time() - self._report.at < self._refresh_s
            if not fresh:
                self._report = await self._monitor.sample()
            assert self._report is not None
            return self._report
