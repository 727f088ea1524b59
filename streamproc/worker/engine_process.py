"""The engine in a process of its own, stepped over two pipes.

With the engine on a thread of the worker, the model's Python code and the event
loop's (consuming, publishing, recording) take turns on one interpreter lock: in a
saturation wave on the 2-core CPU the two threads together never used more than one
core while the other stood a third idle, and decode steps took 10.6 ms against 5.9 ms
for the engine alone. In a process of its own the engine has an interpreter to itself,
as the engine core of the larger serving systems does.

The child (``python -m streamproc.worker.engine_process``, not forked: a fork would copy
torch's thread pools and the worker's event loop) loads the model from the worker's
settings, warms up, then steps
whenever it has work and the worker has collected all but ``ahead`` of its results.
The protocol is :mod:`streamproc.worker.runner`'s; this module carries its messages
over two pipes, encoded as msgpack (typed: a message that is not one the protocol knows
fails to decode). The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C
reaches the whole process group, and the worker drains through its engine): the worker
stops it, and it stops on its own when the worker's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection

import msgspec

from streamproc import logs
from streamproc.config import Device
from streamproc.engine.engine import Engine
from streamproc.engine.loader import load_model
from streamproc.engine.sequence import PreparedRequest
from streamproc.engine.threads import apply_serving_threads
from streamproc.errors import EngineError
from streamproc.logs import LogFormat
from streamproc.worker.runner import (
    Command,
    EngineSide,
    LoopSide,
    Reply,
    Stop,
    start_engine,
)
from streamproc.worker.steps import DEFAULT_AHEAD, checked_ahead

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0


class EngineSpec(msgspec.Struct, frozen=True):
    """What the child needs to build the worker's engine."""

    model: str
    device: Device
    allow_unsafe_weights: bool
    prefill_chunk_tokens: int
    cpu_threads: int
    prefix_cache_bytes: int = 0


class Launch(msgspec.Struct, frozen=True):
    """The first message on the commands pipe."""

    spec: EngineSpec
    ahead: int
    log_format: LogFormat | None
    """The worker's log setup, so the child's lines (its warnings, a failed step's
    traceback) read like the worker's: JSON where the worker logs JSON. None: the
    embedding program configures logging, and the child leaves it alone."""
    log_verbose: bool = False


_encode = msgspec.msgpack.Encoder().encode
_launch_decoder = msgspec.msgpack.Decoder(Launch)
_command_decoder = msgspec.msgpack.Decoder(Command)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


class EngineProcess(LoopSide):
    """An :class:`~streamproc.worker.steps.EngineRunner` in a child process."""

    def __init__(self, spec: EngineSpec, *, ahead: int = DEFAULT_AHEAD) -> None:
        super().__init__(self._send_command)
        self._spec, self._ahead = spec, checked_ahead(ahead)
        self._process: subprocess.Popen[bytes] | None = None
        self._commands: Connection | None = None
        self._reader: threading.Thread | None = None
        self._gone = threading.Event()
        """Set once the child closed its end: every later call raises."""

    @property
    def pid(self) -> int | None:
        """The engine process's pid while it runs."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        self.bind()
        results = await asyncio.to_thread(self._launch)
        setup = logs.active()
        with suppress(EngineError):  # it died before reading: said below
            self._send_bytes(_encode(Launch(self._spec, self._ahead,
                                            setup[0] if setup else None,
                                            bool(setup and setup[1]))))
        self._reader = threading.Thread(target=self._read, args=(results,),
                                        name="engine-results", daemon=True)
        self._reader.start()
        reason = await self.started()
        if reason is not None:
            self.stop()
            raise EngineError(f"the engine process did not start: {reason}")
        log.info("engine process %s ready", self.pid)

    def _launch(self) -> Connection:
        """Start the child; the end of the results pipe to read."""
        commands_read, commands_write = os.pipe()
        results_read, results_write = os.pipe()
        _widen(commands_write)
        _widen(results_write)
        # A command of our own, not multiprocessing's spawn: that would import the
        # embedding program's main module again in the child (and run it, unguarded).
        self._process = subprocess.Popen(
            [sys.executable, "-m", "streamproc.worker.engine_process", str(commands_read),
             str(results_write)], pass_fds=(commands_read, results_write),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(results_write)
        self._commands = Connection(commands_write, readable=False)
        return Connection(results_read, writable=False)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with suppress(EngineError):  # already gone
            self._send_command(Stop())
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("engine process did not stop within %.0fs; killing it",
                        STOP_TIMEOUT_S)
            process.kill()
            process.wait()
        if self._commands is not None:
            self._commands.close()
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT_S)

    def gone_error(self) -> EngineError:
        code = self._process.poll() if self._process is not None else None
        return EngineError(f"the engine process ended while serving (exit code {code})")

    def _send_command(self, command: Command) -> None:
        self._send_bytes(_encode(command))

    def _send_bytes(self, message: bytes) -> None:
        if self._commands is None or self._commands.closed:
            raise EngineError("the engine process was stopped")
        if self._gone.is_set():
            raise self.gone_error()
        try:
            self._commands.send_bytes(message)
        except OSError as exc:  # its end of the pipe closed: it exited or was killed
            raise self.gone_error() from exc

    def _read(self, results: Connection) -> None:
        """Hand every reply to the loop as it arrives, until the child closes its end."""
        with results:
            while True:
                try:
                    reply: Reply | None = _reply_decoder.decode(results.recv_bytes())
                except (EOFError, OSError):
                    self._gone.set()
                    reply = None
                if not self.deliver(reply) or reply is None:
                    return


PIPE_BYTES = 1 << 20
"""Room in each pipe: a step's admissions (a few prompts' token ids) then fit without the
worker's event loop waiting for the engine to read them, which it does between steps."""


def _widen(fd: int) -> None:
    """Grow a pipe's buffer from Linux's default 64 KiB, where the system allows it."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class _PipeInbox:
    def __init__(self, commands: Connection) -> None:
        self._commands = commands

    def get(self, block: bool) -> Command | None:
        try:
            if not block and not self._commands.poll():
                return None
            return _command_decoder.decode(self._commands.recv_bytes())
        except (EOFError, OSError):  # the worker is gone
            return Stop()


def main(argv: list[str]) -> int:
    """``python -m streamproc.worker.engine_process COMMANDS_FD RESULTS_FD``, as
    :class:`EngineProcess` starts it: a :class:`Launch` comes first on the commands pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) != 2:
        print("usage: python -m streamproc.worker.engine_process COMMANDS_FD RESULTS_FD",
              file=sys.stderr)
        return 2
    commands = Connection(int(argv[0]), writable=False)
    results = Connection(int(argv[1]), readable=False)
    try:
        launch = _launch_decoder.decode(commands.recv_bytes())
    except (EOFError, OSError):
        return 0
    if launch.log_format is not None:
        logs.setup(launch.log_format, launch.log_verbose)
        logging.captureWarnings(True)  # warnings too, not as bare lines on stderr

    def send(reply: Reply) -> None:
        results.send_bytes(_encode(reply))

    with suppress(OSError):  # the worker's end closed mid-send: it is gone, and so are we
        engine = start_engine(lambda: _build(launch.spec), send)
        if engine is not None:
            EngineSide(engine, launch.ahead, send,
                       before_step=_crash_hook()).serve(_PipeInbox(commands))
    return 0


CRASH_MARKER_ENV = "STREAMPROC_TEST_CRASH_MARKER"
"""Tests only: a prompt holding this text kills the engine's process as it is admitted,
as a kernel bug or an out-of-memory kill would (see the attempts topic). Unset in any
real deployment; the worker's own environment is where it would have to be set."""


def _crash_hook() -> Callable[[list[PreparedRequest]], None]:
    marker = os.environ.get(CRASH_MARKER_ENV, "")

    def crash_on_marker(admitted: list[PreparedRequest]) -> None:
        if marker and any(marker in str(p.request.prompt) for p in admitted):
            log.error("a prompt holds %s's marker: the engine process dies, on purpose",
                      CRASH_MARKER_ENV)
            os._exit(86)

    return crash_on_marker


def _build(spec: EngineSpec) -> Engine:
    loaded = load_model(spec.model, spec.device, allow_unsafe_weights=spec.allow_unsafe_weights)
    apply_serving_threads(loaded.device, spec.cpu_threads)
    engine = Engine(loaded, prefill_chunk_tokens=spec.prefill_chunk_tokens,
                    prefix_cache_bytes=spec.prefix_cache_bytes)
    engine.warm_up()
    # As the worker does for its own process: the model and the imported modules live
    # as long as this one, and a full collection walks them all (110-270 ms each
    # during this process's start here), stalling every running stream. Rare while
    # serving (none in a 2000-request wave), but a worker runs for days.
    gc.collect()
    gc.freeze()
    return engine


if __name__ == "__main__":
    # Through the module's own name, so its classes are the ones the worker knows.
    from streamproc.worker import engine_process

    code = engine_process.main(sys.argv[1:])
    sys.stderr.flush()
    # Nothing is left to clean up: skip the interpreter's teardown of torch (about a
    # second), which a stopping worker would wait for.
    os._exit(code)
