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
Requests cross the pipe once, when admitted, under a key of their own; their events
come back under that key. The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C
reaches the whole process group, and the worker drains through its engine): the worker
stops it, and it stops on its own when the worker's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import suppress
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from streamproc import logs
from streamproc.config import Device
from streamproc.engine.engine import Engine
from streamproc.engine.loader import load_model
from streamproc.engine.sequence import Outcome, PreparedRequest, TokenEvent
from streamproc.engine.threads import apply_serving_threads
from streamproc.errors import StreamprocError
from streamproc.worker.steps import DEFAULT_AHEAD, StepResult, checked_ahead, run_step

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0


class EngineProcessError(StreamprocError):
    """The engine's process failed to start, or ended while serving."""


class EngineStepError(Exception):
    """A step failed in the engine's process; the message names the original error."""


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build the worker's engine."""

    model: str
    device: Device
    allow_unsafe_weights: bool
    prefill_chunk_tokens: int
    cpu_threads: int


# Worker -> engine.
@dataclass(frozen=True)
class _Submit:
    admitted: list[tuple[int, PreparedRequest]]
    abandon: frozenset[int]
    cancel: frozenset[int]
    """Keys, not ``id()``s: ids mean nothing in another process."""


@dataclass(frozen=True)
class _Collected:
    count: int
    """Results the worker has collected so far."""


@dataclass(frozen=True)
class _Recover:
    pass


@dataclass(frozen=True)
class _Stop:
    pass


# Engine -> worker.
@dataclass(frozen=True)
class _Ready:
    pass


@dataclass(frozen=True)
class _Failed:
    message: str
    submits_taken: int = 0


_Event = tuple[int, list[int], str, Outcome | None]
"""Key, token ids, text and, on a request's last event, its outcome. A plain tuple: a step
sends one per running request, and 128 of them pickle in 16 us against 136 us as
dataclasses (unpickle: 23 against 110 us), time the engine's process would not step in."""


@dataclass(frozen=True)
class _Done:
    events: list[_Event]
    step: StepResult
    """The step's figures; its events travel keyed, above."""
    submits_taken: int
    """How many submits (in all) the engine had taken when this step began."""


@dataclass(frozen=True)
class _Gone:
    """The engine's process closed its pipe (it exited or was killed)."""


class EngineProcess:
    """An :class:`~streamproc.worker.steps.EngineRunner` in a child process."""

    def __init__(self, spec: EngineSpec, *, ahead: int = DEFAULT_AHEAD) -> None:
        self._spec, self._ahead = spec, checked_ahead(ahead)
        self._keys = itertools.count()
        self._sources: dict[int, PreparedRequest] = {}
        self._key_of: dict[int, int] = {}
        """``id()`` of an admitted request -> its key."""
        self._submits_sent = self._submits_taken = self._collected = 0
        self._results: asyncio.Queue[_Done | _Failed | _Gone] = asyncio.Queue()
        self._process: subprocess.Popen[bytes] | None = None
        self._commands: Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The engine process's pid while it runs."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        results = await asyncio.to_thread(self._launch)
        with suppress(EngineProcessError):  # it died before reading: said below
            # With the worker's log setup, so the child's lines (its warnings, a failed
            # step's traceback) read like the worker's: JSON where the worker logs JSON.
            self._send((self._spec, self._ahead, logs.active()))
        first = await asyncio.to_thread(_receive, results)
        if not isinstance(first, _Ready):
            self.stop()
            results.close()
            reason = first.message if isinstance(first, _Failed) else "it exited"
            raise EngineProcessError(f"the engine process did not start: {reason}")
        loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, args=(results, loop),
                                        name="engine-results", daemon=True)
        self._reader.start()
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

    def submit(self, admitted: list[PreparedRequest], abandon: frozenset[int],
               cancel: frozenset[int]) -> None:
        keyed = []
        for prepared in admitted:
            key = next(self._keys)
            self._sources[key] = prepared
            self._key_of[id(prepared)] = key
            keyed.append((key, prepared))
        abandoned = self._keys_for(abandon)
        for key in abandoned:  # its late events, if any, find no source and are dropped
            self._forget(key)
        self._send(_Submit(keyed, abandoned, self._keys_for(cancel)))
        self._submits_sent += 1

    @property
    def expecting(self) -> bool:
        return self._submits_taken < self._submits_sent or not self._results.empty()

    async def next_result(self) -> StepResult | Exception:
        result = await self._results.get()
        if isinstance(result, _Gone):
            raise EngineProcessError("the engine process ended while serving "
                                     f"(exit code {self._exit_code()})")
        self._collected += 1
        self._send(_Collected(self._collected))
        self._submits_taken = result.submits_taken
        if isinstance(result, _Failed):
            return EngineStepError(result.message)
        return replace(result.step, events=self._events(result.events))

    def recover(self) -> None:
        self._sources.clear()
        self._key_of.clear()
        self._send(_Recover())

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with suppress(EngineProcessError):  # already gone
            self._send(_Stop())
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

    def _exit_code(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def _send(self, message: object) -> None:
        if self._commands is None or self._commands.closed:
            raise EngineProcessError("the engine process was stopped")
        try:
            self._commands.send(message)
        except OSError as exc:  # its end of the pipe closed: it exited or was killed
            raise EngineProcessError("the engine process ended while serving "
                                     f"(exit code {self._exit_code()})") from exc

    def _keys_for(self, ids: frozenset[int]) -> frozenset[int]:
        return frozenset(self._key_of[i] for i in ids if i in self._key_of)

    def _forget(self, key: int) -> None:
        prepared = self._sources.pop(key, None)
        if prepared is not None:
            self._key_of.pop(id(prepared), None)

    def _events(self, events: list[_Event]) -> list[TokenEvent]:
        out = []
        for key, token_ids, text, outcome in events:
            source = self._sources.get(key)
            if source is None:  # abandoned while the step ran
                continue
            if outcome is not None:
                self._forget(key)
            out.append(TokenEvent(source, token_ids, text, outcome))
        return out

    def _read(self, results: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every result to the loop as it arrives, until the child closes its end."""
        while True:
            message = _receive(results)
            try:
                loop.call_soon_threadsafe(self._results.put_nowait, message)
            except RuntimeError:  # the loop closed: nobody is left to read
                return
            if isinstance(message, _Gone):
                return


PIPE_BYTES = 1 << 20
"""Room in each pipe: a step's admissions (a few prompts' token ids) then fit without the
worker's event loop waiting for the engine to read them, which it does between steps."""


def _widen(fd: int) -> None:
    """Grow a pipe's buffer from Linux's default 64 KiB, where the system allows it."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _receive(connection: Connection) -> Any:
    try:
        return connection.recv()
    except (EOFError, OSError):
        return _Gone()


def main(argv: list[str]) -> int:
    """``python -m streamproc.worker.engine_process COMMANDS_FD RESULTS_FD``, as
    :class:`EngineProcess` starts it: the spec comes first on the commands pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) != 2:
        print("usage: python -m streamproc.worker.engine_process COMMANDS_FD RESULTS_FD",
              file=sys.stderr)
        return 2
    commands = Connection(int(argv[0]), writable=False)
    results = Connection(int(argv[1]), readable=False)
    try:
        spec, ahead, log_setup = commands.recv()
    except EOFError:
        return 0
    if log_setup is not None:
        logs.setup(*log_setup)
        logging.captureWarnings(True)  # warnings too, not as bare lines on stderr
    _child_main(spec, ahead, commands, results)
    return 0


def _child_main(spec: EngineSpec, ahead: int, commands: Connection,
                results: Connection) -> None:
    try:
        loaded = load_model(spec.model, spec.device,
                            allow_unsafe_weights=spec.allow_unsafe_weights)
        apply_serving_threads(loaded.device, spec.cpu_threads)
        engine = Engine(loaded, prefill_chunk_tokens=spec.prefill_chunk_tokens)
        engine.warm_up()
        # As the worker does for its own process: the model and the imported modules live
        # as long as this one, and a full collection walks them all (110-270 ms each
        # during this process's start here), stalling every running stream. Rare while
        # serving (none in a 2000-request wave), but a worker runs for days.
        gc.collect()
        gc.freeze()
    except Exception as exc:
        # The worker reports why; the traceback is for whoever asks for more (-v).
        log.debug("the engine could not start", exc_info=True)
        results.send(_Failed(f"{type(exc).__name__}: {exc}"))
        return
    try:
        results.send(_Ready())
        _ChildLoop(engine, ahead, commands, results).run()
    except OSError:  # the worker's end closed mid-send: it is gone, and so are we
        return


@dataclass
class _ChildLoop:
    engine: Engine
    ahead: int
    commands: Connection
    results: Connection
    admitted: list[tuple[int, PreparedRequest]] = field(default_factory=list)
    abandon: set[int] = field(default_factory=set)
    cancel: set[int] = field(default_factory=set)
    live: dict[int, PreparedRequest] = field(default_factory=dict)
    key_of: dict[int, int] = field(default_factory=dict)
    """``id()`` of each live request -> its key."""
    submits_taken: int = 0
    submits_pending: int = 0
    started: int = 0
    collected: int = 0
    failed: bool = False

    def run(self) -> None:
        while self._receive(block=not self._may_step()):
            if self._may_step():
                self._step()

    def _may_step(self) -> bool:
        if self.failed or self.started - self.collected >= self.ahead:
            return False
        return bool(self.submits_pending) or self.engine.num_running > 0

    def _receive(self, block: bool) -> bool:
        """Take every command waiting (the first one waited for if ``block``); False to
        stop."""
        try:
            if block and not self._handle(self.commands.recv()):
                return False
            while self.commands.poll():
                if not self._handle(self.commands.recv()):
                    return False
        except (EOFError, OSError):  # the worker is gone
            return False
        return True

    def _handle(self, command: object) -> bool:
        if isinstance(command, _Submit):
            self.admitted += command.admitted
            self.abandon |= command.abandon
            self.cancel |= command.cancel
            self.submits_pending += 1
        elif isinstance(command, _Collected):
            self.collected = command.count
        elif isinstance(command, _Recover):
            self.admitted, self.abandon, self.cancel = [], set(), set()
            self.submits_taken += self.submits_pending
            self.submits_pending = 0
            self.failed = False
        return not isinstance(command, _Stop)

    def _step(self) -> None:
        admitted, abandon, cancel = self.admitted, self.abandon, self.cancel
        self.admitted, self.abandon, self.cancel = [], set(), set()
        self.submits_taken += self.submits_pending
        self.submits_pending = 0
        self.started += 1
        admitted = [(key, p) for key, p in admitted if key not in abandon]
        self.live.update(admitted)
        self.key_of.update((id(p), key) for key, p in admitted)
        try:
            result = run_step(self.engine, [p for _, p in admitted], self._ids(abandon),
                              self._ids(cancel))
        except Exception as exc:  # the worker fails the running requests, then recovers
            # Only this process has the traceback; the worker gets the message.
            log.error("an engine step failed", exc_info=True)
            self.engine.reset()
            self.live.clear()
            self.key_of.clear()
            self.failed = True
            self.results.send(_Failed(f"{type(exc).__name__}: {exc}", self.submits_taken))
            return
        for key in abandon:
            self._retire(key)
        self.results.send(_Done(self._keyed(result.events), replace(result, events=[]),
                                self.submits_taken))

    def _ids(self, keys: set[int]) -> frozenset[int]:
        return frozenset(id(self.live[k]) for k in keys if k in self.live)

    def _retire(self, key: int) -> None:
        prepared = self.live.pop(key, None)
        if prepared is not None:
            del self.key_of[id(prepared)]

    def _keyed(self, events: list[TokenEvent]) -> list[_Event]:
        out = []
        for event in events:
            key = self.key_of[id(event.source)]
            if event.outcome is not None:
                self._retire(key)
            out.append((key, event.token_ids, event.text, event.outcome))
        return out


if __name__ == "__main__":
    # Through the module's own name: what the child pickles must unpickle in the worker
    # as streamproc.worker.engine_process's classes, not as __main__'s.
    from streamproc.worker import engine_process

    code = engine_process.main(sys.argv[1:])
    sys.stderr.flush()
    # Nothing is left to clean up: skip the interpreter's teardown of torch (about a
    # second), which a stopping worker would wait for.
    os._exit(code)
