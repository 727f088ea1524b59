"""Errors that say what the caller should do next.

``retriable`` tells a caller whether the same call may succeed later.
Per-request failures (:class:`RequestError`) become an error response on the
request's reply topic; an :class:`EngineStepError` fails the requests of one step
(retriably); an :class:`EngineError` means the worker must stop.
"""

from __future__ import annotations


class StreamprocError(Exception):
    """Base of every error streamproc raises on purpose."""

    retriable: bool = False


class ConfigError(StreamprocError):
    """A setting is missing, malformed or inconsistent with another."""


class RequestError(StreamprocError):
    """One request cannot be served; ``code`` is what goes on the wire."""

    def __init__(self, code: str, message: str, *, retriable: bool = False,
                 param: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retriable = retriable
        self.param = param
        """The request field at fault, where one is."""


class GenerationError(StreamprocError):
    """The worker answered a request with an error message (client side)."""

    def __init__(self, request_id: str, code: str, message: str, retriable: bool) -> None:
        super().__init__(f"request {request_id} failed: {code}: {message}")
        self.request_id = request_id
        self.code = code
        self.retriable = retriable


class OverloadedError(StreamprocError):
    """The lane's backlog is over the caller's limit; try again after ``retry_after_s``."""

    retriable = True

    def __init__(self, topic: str, drain_s: float, retry_after_s: float) -> None:
        shown = "unknown (no worker reports throughput)" if drain_s == float("inf") \
            else f"{drain_s:.1f}s"
        super().__init__(f"{topic} is overloaded: estimated drain time {shown}; "
                         f"retry after {retry_after_s:.1f}s")
        self.topic = topic
        self.drain_s = drain_s
        self.retry_after_s = retry_after_s


class EngineError(StreamprocError):
    """The engine did not start, or ended while serving: the worker must stop."""


class EngineStepError(StreamprocError):
    """One engine step failed; the message names the original error. The running
    requests fail with it (retriably) and the engine serves on, reset — unless the step
    ran out of memory (``out_of_memory``): then they are retried in a smaller batch."""

    retriable = True

    def __init__(self, message: str, *, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


class PublishError(StreamprocError):
    """The broker would not take a message after the producer's retries."""


class WorkerStalledError(StreamprocError):
    """The worker's event loop stood still past what its group waits (frozen, paused):
    it may have lost its partitions, so it stops publishing and exits; restart it."""

    retriable = True


class TopicMissingError(StreamprocError):
    """A topic the command needs does not exist on the broker."""


class LocalKafkaError(StreamprocError):
    """The local development broker could not be provisioned or started."""


class ModelError(StreamprocError):
    """A model could not be found, fetched, converted or loaded."""
