"""Logging setup: readable lines for a person, JSON lines for a log pipeline.

Records about one request carry ``request_id``, ``topic``, ``partition`` and
``offset`` as ``extra`` fields; the JSON format puts them at the top level.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

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


def setup(fmt: LogFormat = "text", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiokafka reports every retry at INFO; that is noise for a person at a terminal.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def record_context(topic: str, partition: int, offset: int,
                   request_id: str | None = None) -> dict[str, object]:
    """``extra=`` for a log call about one record."""
    context: dict[str, object] = {"topic": topic, "partition": partition, "offset": offset}
    if request_id is not None:
        context["request_id"] = request_id
    return context
