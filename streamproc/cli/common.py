"""Pieces every subcommand shares: the broker address, logging, the event loop."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from streamproc import logs
from streamproc.config import KafkaSecurity, bootstrap_from_env
from streamproc.errors import ConfigError

T = TypeVar("T")


def add_bootstrap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap servers (default: $STREAMPROC_BOOTSTRAP)")


def bootstrap(args: argparse.Namespace) -> str:
    value: str | None = args.bootstrap or bootstrap_from_env()
    if not value:
        raise ConfigError("no broker: pass --bootstrap HOST:PORT or set STREAMPROC_BOOTSTRAP "
                          "(`streamproc local-kafka start` prints one)")
    return value


def security() -> KafkaSecurity:
    """SASL/TLS settings from ``STREAMPROC_SECURITY_PROTOCOL`` and friends."""
    return KafkaSecurity.from_env()


def setup_logging(verbose: bool = False, fmt: logs.LogFormat = "text") -> None:
    logs.setup(fmt, verbose)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result
