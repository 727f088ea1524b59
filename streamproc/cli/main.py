"""``streamproc``: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from streamproc.cli import (
    bench_cmd,
    broker_cmds,
    demo_cmd,
    lag_cmd,
    model_cmd,
    submit_cmd,
    worker_cmd,
)
from streamproc.errors import OverloadedError, StreamprocError
from streamproc.signals import handlers_swapped

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamproc",
        description="LLM generation over Kafka: prompt jobs in, streamed token chunks out.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker_cmd.register(sub)
    submit_cmd.register(sub)
    submit_cmd.register_cancel(sub)
    lag_cmd.register(sub)
    broker_cmds.register(sub)
    demo_cmd.register(sub)
    model_cmd.register(sub)
    bench_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    with raise_on_signals():
        return _run(handler, args)


def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except OverloadedError as exc:
        print(f"streamproc: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except StreamprocError as exc:
        print(f"streamproc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the command wherever it is, so what it started (a local
    broker, the demo's worker, the bench's peers) is stopped on the way out.

    Ctrl-C raises KeyboardInterrupt at once, as Python's own handler does; being another
    function than that handler keeps ``asyncio.run`` from installing its own, which turns a
    first Ctrl-C into a cancellation of its main task: a task can lose a cancellation (on
    Python 3.11, ``wait_for`` drops one that races its inner future's completion), and then
    the command carries on as if nothing was pressed. SIGTERM (`kill`, a supervisor) exits
    with 128 + 15. The worker's event loop sets its own handlers while it serves, to drain.
    """
    with handlers_swapped({signal.SIGINT: _interrupt, signal.SIGTERM: _exit_on_sigterm}):
        yield


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
