"""Swapping the process's signal handlers for the length of a block."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType

SignalHandler = Callable[[int, FrameType | None], object]


@contextmanager
def handlers_swapped(handlers: Mapping[signal.Signals, SignalHandler]) -> Iterator[None]:
    """``handlers`` while the block runs, the previous ones after it. Only the main thread
    may set handlers (and only it receives signals): in another this swaps nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
