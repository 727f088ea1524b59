"""Logging setup: readable lines for a person, JSON lines for a log pipeline.

Records about one request carry ``request_id``, ``topic``, ``partition`` and
``offset`` as ``extra`` fields; the JSON format puts them at the top level.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]
CONTEXT_FIELDS = ("request_id", "topic", "partition", "offset", "code")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to ``sys.stderr`` as it is when a record comes, as logging's last-resort
    handler does, not to the stream it was when set up: a redirect made later (by a
    test harness, by an embedding application) is followed, not written past."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


LogSetup = tuple[LogFormat, bool]
"""A format and whether verbose: what :func:`setup` was given."""

_active: LogSetup | None = None


def setup(fmt: LogFormat = "text", verbose: bool = False) -> None:
    global _active
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiokafka reports every retry at INFO; that is noise for a person at a terminal.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    _active = (fmt, verbose)
    adopt_library_loggers()


def active() -> LogSetup | None:
    """How :func:`setup` configured this process; None if it did not (an application
    embedding streamproc configures its own logging)."""
    return _active


def adopt_library_loggers() -> None:
    """Once :func:`setup` ran: transformers' records through the root logger, in our
    format, instead of through the stderr handler transformers installs for itself
    (whose lines a JSON log pipeline cannot parse). A no-op until transformers is
    imported; its loader module calls this again when it is."""
    if _active is None or "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def record_context(topic: str, partition: int, offset: int,
                   request_id: str | None = None) -> dict[str, object]:
    """``extra=`` for a log call about one record."""
    context: dict[str, object] = {"topic": topic, "partition": partition, "offset": offset}
    if request_id is not None:
        context["request_id"] = request_id
    return context
