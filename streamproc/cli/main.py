"""``streamproc``: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

from streamproc.cli import bench_cmd, broker_cmds, demo_cmd, lag_cmd, submit_cmd, worker_cmd
from streamproc.errors import OverloadedError, StreamprocError

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
    bench_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`kill`, a supervisor) unwinds the command like Ctrl-C, so what it started
        # (a local broker, the demo's worker, the bench's peers) is stopped, not left running.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
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


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
