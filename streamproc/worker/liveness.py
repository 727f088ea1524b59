"""Knowing that this worker may have been given up on by its group.

A worker frozen past its session timeout (SIGSTOP, a VM paused, a swap storm) has lost its
partitions by the time it runs again, but learns so only at its next heartbeat. Until then
its event loop would go on publishing tokens for requests that another worker has taken
over. The reader rule already drops such messages when they follow the takeover; what it
cannot drop is a zombie starting a request afresh that the new owner also started. So a
worker that sees its own event loop stopped for longer than the group would wait publishes
nothing more and exits (a supervisor starts it again; its requests are taken over).

The check is a clock comparison on every publish and on a ticker, so whichever runs first
after the freeze trips it.
"""

from __future__ import annotations

import asyncio
import time

from streamproc.errors import WorkerStalledError

SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
TICK_S = 0.25


class Liveness:
    """Trips once the event loop was stopped longer than ``limit_s``: the group may have
    expired this worker (its last heartbeat may have gone out up to a heartbeat interval
    before the stop)."""

    def __init__(self, limit_s: float = (SESSION_TIMEOUT_MS - HEARTBEAT_INTERVAL_MS) / 1000
                 ) -> None:
        self.limit_s = limit_s
        self._last = time.monotonic()
        self._stalled_for: float | None = None

    @property
    def tripped(self) -> bool:
        return self._stalled_for is not None

    def check(self) -> None:
        """Raise :class:`WorkerStalledError` if the loop was stopped too long (for good:
        once tripped, every later check raises too)."""
        now = time.monotonic()
        if self._stalled_for is None and now - self._last > self.limit_s:
            self._stalled_for = now - self._last
        if self._stalled_for is not None:
            raise WorkerStalledError(
                f"this worker's event loop stood still for {self._stalled_for:.1f}s, longer "
                f"than its group waits ({self.limit_s:.1f}s before a session timeout): it "
                "may have lost its partitions, so it publishes nothing more and exits")
        self._last = now

    async def run(self) -> None:
        """Check every ``TICK_S``; raises when tripped. The clock starts here: a worker's
        start (its engine loading a model) is no stall."""
        self._last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            self.check()
