"""Running ``streamproc worker`` as a real process, for shutdown and restart tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

from streamproc.client import StreamprocClient
from streamproc.config import TopicNames, WorkerConfig

from .helpers import wait_for_lag_zero

T = TypeVar("T")


def write_topics_file(directory: Path, names: TopicNames) -> Path:
    """A ``topics/`` folder declaring ``names``, for the worker's ``--topics-dir``."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(t, "requests") for t in names.requests]
    entries += [(names.responses, "responses"), (names.dead_letter, "dead_letter"),
                (names.status, "status"), (names.control, "control")]
    if names.attempts:
        entries.append((names.attempts, "attempts"))
    # Lanes are written highest first, with falling priorities, to keep their order.
    body = "".join(f'[[topic]]\nname = "{name}"\nrole = "{role}"\npartitions = 4\n'
                   f'priority = {-i}\n\n' for i, (name, role) in enumerate(entries))
    (directory / "test.toml").write_text(body)
    return directory


RUNNING: list[WorkerProcess] = []
"""Every worker process started, so a test that fails midway leaves none behind."""


class WorkerProcess:
    def __init__(self, config: WorkerConfig, topics_dir: Path, log: Path,
                 *extra: str, env: dict[str, str] | None = None) -> None:
        self.command = [sys.executable, "-m", "streamproc", "worker",
                        "--bootstrap", config.bootstrap, "--model", config.model,
                        "--device", "cpu", "--group", config.group_id,
                        "--topics-dir", str(topics_dir), *extra]
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float = 120.0) -> None:
        """Start and wait until the worker has joined its group."""
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdout=out, stderr=out, env=self.env)
        RUNNING.append(self)
        deadline = time.monotonic() + timeout_s
        while "partitions assigned" not in self.log.read_text(errors="replace"):
            assert self.process.returncode is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker did not join its group"
            await asyncio.sleep(0.1)

    async def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    def kill(self) -> None:
        """If still running (a test failed midway), end it at once: never leave it behind.
        By pid: the test's event loop, and with it the process handle, may be closed."""
        if self.process is not None and self.process.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)


async def gather_then_stop(config: WorkerConfig, tasks: list[asyncio.Task[T]],
                           worker: WorkerProcess) -> list[T]:
    """Every task's outcome; then, with the worker still up, its commits catching up.

    A final can go out just as its partition is revoked: the client has its answer, but the
    record was not committed, so it is read and served again (the client drops the repeat).
    The lag reaches 0 once that is done, so it is awaited before the worker stops.
    """
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 240)
        await wait_for_lag_zero(config.bootstrap, config.group_id, config.topics.requests, 60)
    finally:
        await worker.terminate()
    return outcomes


def client_for(config: WorkerConfig) -> StreamprocClient:
    """A client of the first (highest) lane and the default reply topic."""
    return StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                            reply_topic=config.topics.responses)
