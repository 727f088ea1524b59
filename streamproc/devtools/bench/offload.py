"""Long computations off the event loop, on threads that never hold up an exit.

``asyncio.to_thread`` runs on the loop's default executor, which the loop joins when it
closes: after Ctrl-C the bench would wait for a ``generate()`` sweep or a long-prompt run
to finish (half a minute on a real model) before stopping anything. A daemon thread is
simply abandoned at exit, so Ctrl-C stops the bench, its peers and its broker at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a daemon thread, awaited."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        def deliver() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(deliver)

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            settle(error=exc)
        else:
            settle(result)

    threading.Thread(target=work, name=f"bench-{getattr(fn, '__name__', 'work')}",
                     daemon=True).start()
    return await future
