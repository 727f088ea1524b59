"""The stepping protocol between the serving loop and the engine, implemented once.

The engine runs on a thread of the worker's (:mod:`streamproc.worker.engine_thread`) or in
a process of its own (:mod:`streamproc.worker.engine_process`). Both speak this protocol;
they differ only in what carries its messages (in-process queues, or two pipes carrying
msgpack). :class:`EngineSide` is the engine's end, :class:`LoopSide` the serving loop's.

The loop posts :class:`Submit` (requests admitted, keys to drop silently or to end as
cancelled); the engine steps whenever it has work and the loop has collected all but
``ahead`` of its results, and answers each step with :class:`Done` (or :class:`Failed`).
The loop acknowledges each result with :class:`Collected`, which is what lets the engine
run ahead by a bounded number of steps. After a failed step the engine takes no submit
until the loop, having failed the running requests, sends :class:`Recover`: nothing
submitted before the failure was seen runs on the reset engine.

Requests are named across the boundary by :attr:`PreparedRequest.key`, which is the same
on both sides; a request crosses once, when admitted, and its events come back keyed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import msgspec
import torch

from streamproc.engine.engine import Engine
from streamproc.engine.sequence import Outcome, PreparedRequest, TokenEvent
from streamproc.errors import EngineError, EngineStepError
from streamproc.wire import TokenLogprob
from streamproc.worker.steps import StepFigures, StepResult, checked_ahead, run_step

log = logging.getLogger(__name__)


# The loop -> the engine.
class Submit(msgspec.Struct, frozen=True, tag=True, array_like=True):
    admitted: list[PreparedRequest]
    abandon: frozenset[int]
    cancel: frozenset[int]


class Collected(msgspec.Struct, frozen=True, tag=True, array_like=True):
    count: int
    """Results the loop has collected so far."""


class Recover(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


class Stop(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


Command = Submit | Collected | Recover | Stop


# The engine -> the loop.
class Ready(msgspec.Struct, frozen=True, tag=True, array_like=True):
    free_device_bytes: int = 0
    """The accelerator's free memory once the engine is warm (0 on a CPU)."""


KeyedEvent = tuple[int, list[int], str, Outcome | None, list[TokenLogprob] | None]
"""Key, token ids, text and, on a request's last event, its outcome. A tuple, not a
struct: a step sends one per running request, and tuples encode and decode fastest."""


class Done(msgspec.Struct, frozen=True, tag=True, array_like=True):
    events: list[KeyedEvent]
    figures: StepFigures
    submits_taken: int
    """How many submits (in all) the engine had taken when this step began."""


class Failed(msgspec.Struct, frozen=True, tag=True, array_like=True):
    message: str
    submits_taken: int = 0
    out_of_memory: bool = False


Reply = Ready | Done | Failed


class Inbox(Protocol):
    def get(self, block: bool) -> Command | None:
        """The next command; None if ``block`` is false and none is waiting. A closed
        channel reads as :class:`Stop`."""


Send = Callable[[Reply], None]
"""Hands a reply to the loop; raises OSError when the loop's end is gone."""


class EngineSide:
    """The engine's end: take commands, step when allowed, answer each step."""

    def __init__(self, engine: Engine, ahead: int, send: Send, *,
                 before_step: Callable[[list[PreparedRequest]], object] = lambda _: None
                 ) -> None:
        self._engine, self._ahead, self._send = engine, checked_ahead(ahead), send
        self._before_step = before_step
        self._admitted: list[PreparedRequest] = []
        self._abandon: set[int] = set()
        self._cancel: set[int] = set()
        self._submits_pending = self._submits_taken = 0
        self._started = self._collected = 0
        self._failed = False

    def serve(self, inbox: Inbox) -> None:
        """Until :class:`Stop` (or the loop's end closes)."""
        try:
            while True:
                command = inbox.get(block=not self._may_step())
                while command is not None:
                    if not self._handle(command):
                        return
                    command = inbox.get(block=False)
                if self._may_step():
                    self._step()
        except OSError:  # the loop's end closed mid-send: nobody is left to serve
            log.debug("the serving loop is gone; the engine stops")

    def _may_step(self) -> bool:
        if self._failed or self._started - self._collected >= self._ahead:
            return False
        return bool(self._submits_pending) or self._engine.num_running > 0

    def _handle(self, command: Command) -> bool:
        if isinstance(command, Submit):
            self._admitted += command.admitted
            self._abandon |= command.abandon
            self._cancel |= command.cancel
            self._submits_pending += 1
        elif isinstance(command, Collected):
            self._collected = command.count
        elif isinstance(command, Recover):
            self._take()
            self._failed = False
        return not isinstance(command, Stop)

    def _take(self) -> tuple[list[PreparedRequest], frozenset[int], frozenset[int]]:
        """Everything submitted so far, as the next step's input."""
        taken = (self._admitted, frozenset(self._abandon), frozenset(self._cancel))
        self._admitted, self._abandon, self._cancel = [], set(), set()
        self._submits_taken += self._submits_pending
        self._submits_pending = 0
        return taken

    def _step(self) -> None:
        admitted, abandon, cancel = self._take()
        self._started += 1
        admitted = [p for p in admitted if p.key not in abandon]
        self._before_step(admitted)
        try:
            result = run_step(self._engine, admitted, abandon, cancel)
        except Exception as exc:  # the loop fails the running requests, then recovers
            # Only this side has the traceback; the loop gets the message.
            log.error("an engine step failed", exc_info=True)
            self._engine.reset()
            self._failed = True
            self._send(Failed(f"{type(exc).__name__}: {exc}", self._submits_taken,
                              is_out_of_memory(exc)))
            return
        events = [(e.source.key, e.token_ids, e.text, e.outcome, e.logprobs)
                  for e in result.events]
        self._send(Done(events, result.figures, self._submits_taken))


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failed: the step asked for more memory than there is."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def start_engine(build: Callable[[], Engine], send: Send) -> Engine | None:
    """Build the engine (warmed up), then say :class:`Ready`; None (having said why, in
    :class:`Failed`) if it could not start."""
    try:
        engine = build()
    except Exception as exc:
        # The worker reports why; the traceback is for whoever asks for more (-v).
        log.debug("the engine could not start", exc_info=True)
        send(Failed(f"{type(exc).__name__}: {exc}"))
        return None
    send(Ready(engine.free_device_bytes()))
    return engine


class LoopSide:
    """The serving loop's end, an :class:`~streamproc.worker.steps.EngineRunner` once
    :meth:`started`. ``send`` carries a command to the engine (raising
    :class:`~streamproc.errors.EngineError` when it cannot); replies arrive through :meth:`deliver`,
    from any thread, ``None`` meaning the engine's end closed."""

    def __init__(self, send: Callable[[Command], None]) -> None:
        self._send = send
        self._sources: dict[int, PreparedRequest] = {}
        self._submits_sent = self._submits_taken = self._collected = 0
        self._replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.free_device_bytes = 0
        """What the engine said of its accelerator's free memory when it started."""

    def deliver(self, reply: Reply | None) -> bool:
        """Hand ``reply`` to the loop (thread-safe); False if the loop is gone."""
        assert self._loop is not None, "deliver before bind"
        try:
            self._loop.call_soon_threadsafe(self._replies.put_nowait, reply)
        except RuntimeError:  # the event loop closed: nobody is left to read
            return False
        return True

    def bind(self) -> None:
        """Replies go to the running event loop."""
        self._loop = asyncio.get_running_loop()

    async def started(self) -> str | None:
        """Wait for the engine to start; None once ready, else why it did not."""
        first = await self._replies.get()
        if isinstance(first, Ready):
            self.free_device_bytes = first.free_device_bytes
            return None
        return first.message if isinstance(first, Failed) else "it exited"

    def submit(self, admitted: list[PreparedRequest], abandon: frozenset[int],
               cancel: frozenset[int]) -> None:
        for prepared in admitted:
            self._sources[prepared.key] = prepared
        for key in abandon:  # its late events, if any, find no source and are dropped
            self._sources.pop(key, None)
        self._send(Submit(admitted, abandon, cancel))
        self._submits_sent += 1

    @property
    def expecting(self) -> bool:
        return self._submits_taken < self._submits_sent or not self._replies.empty()

    async def next_result(self) -> StepResult | Exception:
        reply = await self._replies.get()
        if not isinstance(reply, Done | Failed):
            raise self.gone_error()
        self._collected += 1
        self._send(Collected(self._collected))
        self._submits_taken = reply.submits_taken
        if isinstance(reply, Failed):
            return EngineStepError(reply.message, out_of_memory=reply.out_of_memory)
        return StepResult.of(reply.figures, self._events(reply.events))

    def recover(self) -> None:
        self._sources.clear()
        self._send(Recover())

    def gone_error(self) -> EngineError:
        """What :meth:`next_result` raises once the engine's end closed."""
        return EngineError("the engine stopped while serving")

    def _events(self, events: list[KeyedEvent]) -> list[TokenEvent]:
        out = []
        for key, token_ids, text, outcome, logprobs in events:
            source = self._sources.get(key)
            if source is None:  # abandoned while the step ran
                continue
            if outcome is not None:
                del self._sources[key]
            out.append(TokenEvent(source, token_ids, text, outcome, logprobs))
        return out
