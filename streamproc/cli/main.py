"""``streamproc``: the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from streamproc.cli import (
    batch_cmd,
    bench_cmd,
    broker_cmds,
    config_cmd,
    demo_cmd,
    lag_cmd,
    model_cmd,
    submit_cmd,
    worker_cmd,
)
from streamproc.cli.failures import Exit, explain
from streamproc.config import bootstrap_from_env
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
    batch_cmd.register(sub)
    lag_cmd.register(sub)
    broker_cmds.register(sub)
    demo_cmd.register(sub)
    model_cmd.register(sub)
    config_cmd.register(sub)
    bench_cmd.register(sub)
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``-v`` on every command (before or after it): debug logs, and a failure's traceback."""
    if "--verbose" not in parser._option_string_actions:
        top = parser.prog == "streamproc"
        parser.add_argument("-v", "--verbose", action="store_true",
                            default=False if top else argparse.SUPPRESS,
                            help="debug logging, and the traceback of a failure")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _add_verbose(subparser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    with raise_on_signals():
        return _run(handler, args)


def _run(handler: Handler, args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):
        # aiokafka logs every failed connection attempt at ERROR, before the command can
        # say in one line what is wrong. (A worker's log setup shows its warnings again.)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return handler(args)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except Exception as exc:
        code, line = explain(exc, getattr(args, "bootstrap", None) or bootstrap_from_env())
        if getattr(args, "verbose", False):
            traceback.print_exception(exc)
        print(f"streamproc: error: {line}", file=sys.stderr)
        return code


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
