"""What a command prints and returns when it fails: one line naming the problem and the
fix, and an exit code a script can tell apart. ``-v`` adds the traceback."""

from __future__ import annotations

import errno
from enum import IntEnum

from aiokafka.errors import (
    KafkaConnectionError,
    NoBrokersAvailable,
    UnknownTopicOrPartitionError,
)

from streamproc.errors import (
    ConfigError,
    EngineError,
    ModelError,
    OverloadedError,
    StreamprocError,
    TopicMissingError,
    WorkerStalledError,
)


class Exit(IntEnum):
    """Every exit code a streamproc command returns."""

    OK = 0
    FAILED = 1
    """The command ran, and what it reports failed (a request, drift, a check)."""
    USAGE = 2
    """A bad option value or setting (argparse uses 2 for its own errors too)."""
    BROKER = 3
    """No Kafka broker answered at the bootstrap address."""
    TOPIC = 4
    """A topic the command needs does not exist."""
    MODEL = 5
    """The model could not be found, fetched or loaded."""
    PORT = 6
    """A port the command would listen on is taken."""
    ENGINE = 7
    """The engine did not start, or stopped while serving."""
    TIMEOUT = 8
    """No answer within the time allowed (``submit --timeout``)."""
    STALLED = 9
    """The worker was frozen past its group's session timeout and stopped publishing;
    start it again (its requests were taken over)."""
    INTERNAL = 70
    """Anything else: a bug (EX_SOFTWARE)."""
    OVERLOADED = 75
    """Admission refused the job; try again later (EX_TEMPFAIL)."""
    INTERRUPTED = 130
    """Ctrl-C."""


def explain(exc: BaseException, bootstrap: str | None) -> tuple[Exit, str]:
    """The exit code and the line to print for ``exc``."""
    exc = _leaf(exc)
    if isinstance(exc, OverloadedError):
        return Exit.OVERLOADED, str(exc)
    if isinstance(exc, KafkaConnectionError | NoBrokersAvailable):
        where = f" at {bootstrap}" if bootstrap else ""
        return Exit.BROKER, (f"no Kafka broker answers{where}: check --bootstrap (or "
                             "STREAMPROC_BOOTSTRAP), or start one with "
                             "`streamproc local-kafka start`")
    if isinstance(exc, TopicMissingError | UnknownTopicOrPartitionError):
        detail = str(exc) if isinstance(exc, TopicMissingError) else "a topic does not exist"
        return Exit.TOPIC, f"{detail}: create the topics with `streamproc topics apply`"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return Exit.PORT, (f"{exc.strerror}: pick a free port (--metrics-port, --port) or "
                           "stop what holds it")
    if isinstance(exc, OSError) and exc.filename is not None:
        return Exit.USAGE, f"{exc.strerror}: {exc.filename}"
    if isinstance(exc, UnicodeDecodeError):
        return Exit.USAGE, f"the input is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, TimeoutError):
        return Exit.TIMEOUT, ("no answer within the time allowed (--timeout): is a worker "
                              "running? `streamproc lag` shows the group and its lag")
    if isinstance(exc, WorkerStalledError):
        return Exit.STALLED, str(exc)
    if isinstance(exc, ModelError):
        return Exit.MODEL, str(exc)
    if isinstance(exc, EngineError):
        return Exit.ENGINE, str(exc)
    if isinstance(exc, ConfigError):
        return Exit.USAGE, str(exc)
    if isinstance(exc, StreamprocError):
        return Exit.FAILED, str(exc)
    return Exit.INTERNAL, (f"unexpected {type(exc).__name__}: {exc} (run again with -v for "
                           "the traceback, and please report it)")


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside a task group's exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
