"""What would stop a worker later, checked before it loads the model: the broker answers,
the topics it reads and writes exist, the metrics port is free. Each fails in one line
that says what to do (the CLI maps it to an exit code), in seconds rather than after the
weights have loaded."""

from __future__ import annotations

import errno
import logging
import socket

from streamproc import kafka
from streamproc.config import WorkerConfig
from streamproc.errors import TopicMissingError


async def preflight(config: WorkerConfig) -> None:
    port_is_free(config.metrics_address, config.metrics_port)
    await topics_exist(config)


def port_is_free(address: str, port: int, what: str = "metrics port") -> None:
    """Raise the ``EADDRINUSE`` error serving on ``address:port`` would meet (0: none)."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        # As the metrics server binds: it sets SO_REUSEADDR, so only a live listener counts.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"{what} {address}:{port} is in use") from exc
            raise


async def topics_exist(config: WorkerConfig) -> None:
    names = config.topics
    needed = {*names.requests, names.responses, names.dead_letter, names.status,
              names.control, *([names.attempts] if names.attempts else [])}
    client = kafka.admin(config.bootstrap, config.security)
    library = logging.getLogger("aiokafka")
    quiet = library.getEffectiveLevel() > logging.DEBUG
    level = library.level
    if quiet:  # each failed attempt is an ERROR line; the caller says it once, plainly
        library.setLevel(logging.CRITICAL)
    try:
        await client.start()
        existing = set(await client.list_topics())
    finally:
        library.setLevel(level)
        await client.close()
    missing = sorted(needed - existing)
    if missing:
        raise TopicMissingError(f"{', '.join(missing)} "
                                f"{'does' if len(missing) == 1 else 'do'} not exist on "
                                f"{config.bootstrap}")
