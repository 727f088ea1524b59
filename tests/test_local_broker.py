"""The local broker the project provisions: a start that fails leaves nothing behind.

The tests that start Kafka itself are marked ``kafka``; the ready wait's tests talk
to a stand-in and run under ``make unit`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka.protocol.admin import ApiVersionResponse_v0
from aiokafka.protocol.coordination import FindCoordinatorResponse_v0
from aiokafka.protocol.metadata import MetadataResponse_v0

from streamproc import topics
from streamproc.devtools import localkafka
from streamproc.errors import LocalKafkaError


def processes_mentioning(text: str) -> list[int]:
    """Pids of running processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.mark.kafka
async def test_a_new_partitions_indexes_are_small_enough_to_fault_in_at_once(
        tmp_path: Path) -> None:
    """Kafka's default 10 MiB index files, sparse and mapped, stalled the first write to
    each new partition's index for 40-90 ms on a disk with a large read-ahead."""
    state_dir = tmp_path / "broker"
    broker = await asyncio.to_thread(localkafka.start, state_dir, progress=lambda _: None)
    try:
        spec = replace(topics.load_specs()[0], partitions=1)
        await topics.apply(broker.bootstrap, [spec])
        segment = state_dir / "kafka-data" / f"{spec.name}-0"
        sizes = [(segment / f"00000000000000000000.{kind}").stat().st_size
                 for kind in ("index", "timeindex")]
        # Kafka rounds each down to whole entries (8 and 12 bytes).
        assert all(0 < size <= localkafka.INDEX_BYTES for size in sizes), sizes
    finally:
        await asyncio.to_thread(localkafka.stop, state_dir)


@pytest.mark.kafka
def test_a_broker_that_cannot_start_leaves_nothing_running(tmp_path: Path) -> None:
    state_dir = tmp_path / "broker"
    with socket.socket() as taken:  # Kafka's port is in use: it exits during its start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(LocalKafkaError):
            localkafka.start(state_dir, port=taken.getsockname()[1], progress=lambda _: None)
    assert processes_mentioning(str(state_dir)) == []  # not even ZooKeeper
    assert localkafka.status(state_dir) is None


@pytest.mark.kafka
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_a_start_leaves_nothing_running(tmp_path: Path, stop: int) -> None:
    """Ctrl-C or `kill` during ``streamproc local-kafka start``: ZooKeeper and Kafka run in
    sessions of their own, so the signal reaches only the command, which must stop them."""
    state_dir = tmp_path / "broker"
    command = [sys.executable, "-m", "streamproc", "local-kafka", "start",
               "--state-dir", str(state_dir)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as starting:
        deadline = time.monotonic() + 120
        while not (state_dir / "state.json").exists():  # both are spawned, Kafka not ready
            assert starting.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        starting.send_signal(stop)
        assert starting.wait(60) != 0
    assert processes_mentioning(str(state_dir)) == []
    assert localkafka.status(state_dir) is None


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler, whatever the process started with: started in the
    background by a shell without job control (as CI may run the suite), it ignores Ctrl-C,
    and Python then installs no handler of its own. Put back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_during_a_spawn_waits_for_its_bookkeeping() -> None:
    """Ctrl-C inside the held block lands when the block ends, so a process spawned there
    is already recorded for the cleanup; the handler is the one from before."""
    recorded = []

    def spawn_interrupted() -> None:
        with localkafka._signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a handler would have run by now
            recorded.append("spawned")

    with pytest.raises(KeyboardInterrupt):
        spawn_interrupted()
    assert recorded == ["spawned"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_during_a_spawn_reaches_the_handler_from_before() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        with localkafka._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_nothing_is_held() -> None:
    """Only the main thread may set handlers; elsewhere the block just runs."""
    ran: list[bool] = []
    before = signal.getsignal(signal.SIGINT)

    def spawn_in_a_thread() -> None:
        with localkafka._signals_held():
            ran.append(signal.getsignal(signal.SIGINT) is before)

    thread = threading.Thread(target=spawn_in_a_thread)
    thread.start()
    thread.join()
    assert ran == [True]


class BrokerNotYetListingItself:
    """A stand-in for a Kafka broker in the moment after it logs its start, which a real one
    cannot be held in on demand: its first ``empty_answers`` metadata answers list no brokers
    (its controller has not told it who is in the cluster yet), later ones list itself, and it
    names itself the group coordinator. It speaks just enough of the protocol for that, and
    only in version 0 of each API."""

    def __init__(self, empty_answers: int) -> None:
        self.empty_answers = empty_answers
        self.metadata_answers = 0
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                request = await reader.readexactly(size)
                api_key = int.from_bytes(request[0:2], "big")
                body = self.answer(api_key)
                correlation_id = request[4:8]
                writer.write(len(correlation_id + body).to_bytes(4, "big") + correlation_id + body)
                await writer.drain()
        except asyncio.IncompleteReadError:  # the client hung up
            writer.close()

    def answer(self, api_key: int) -> bytes:
        if api_key == ApiVersionResponse_v0.API_KEY:
            versions = [(key, 0, 0) for key in (MetadataResponse_v0.API_KEY,
                                                 FindCoordinatorResponse_v0.API_KEY)]
            return bytes(ApiVersionResponse_v0(0, versions).encode())
        if api_key == MetadataResponse_v0.API_KEY:
            self.metadata_answers += 1
            listed = self.metadata_answers > self.empty_answers
            brokers = [(0, "127.0.0.1", self.port)] if listed else []
            return bytes(MetadataResponse_v0(brokers, []).encode())
        assert api_key == FindCoordinatorResponse_v0.API_KEY, api_key
        return bytes(FindCoordinatorResponse_v0(0, 0, "127.0.0.1", self.port).encode())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"127.0.0.1:{self.port}"


async def test_the_ready_wait_retries_while_a_fresh_broker_lists_no_brokers() -> None:
    """A CI run once failed every broker test here: aiokafka's lookup asserted on the empty
    broker list instead of raising a retriable error."""
    broker = BrokerNotYetListingItself(empty_answers=3)
    async with broker.running() as address:
        await localkafka._wait_for_group_coordinator(address, time.monotonic() + 30)
    assert broker.metadata_answers > 3


async def test_the_ready_wait_gives_up_with_a_clear_error_at_its_deadline() -> None:
    broker = BrokerNotYetListingItself(empty_answers=10**6)
    async with broker.running() as address:
        with pytest.raises(LocalKafkaError, match="lists no brokers"):
            await localkafka._wait_for_group_coordinator(address, time.monotonic() + 0.5)
    assert broker.metadata_answers > 1
