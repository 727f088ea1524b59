"""The local broker the project provisions: a start that fails leaves nothing behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamproc import localkafka
from streamproc.errors import LocalKafkaError

pytestmark = pytest.mark.kafka


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


def test_a_broker_that_cannot_start_leaves_nothing_running(tmp_path: Path) -> None:
    state_dir = tmp_path / "broker"
    with socket.socket() as taken:  # Kafka's port is in use: it exits during its start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(LocalKafkaError):
            localkafka.start(state_dir, port=taken.getsockname()[1], progress=lambda _: None)
    assert processes_mentioning(str(state_dir)) == []  # not even ZooKeeper
    assert localkafka.status(state_dir) is None


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
