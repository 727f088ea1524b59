"""Frozen, documented configuration, read from the environment in one place.

Nothing reads the environment at import time: :func:`WorkerConfig.from_env`
is the only door, and the CLI passes its flags on top of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from streamproc.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
ENV_PREFIX = "STREAMPROC_"


def bootstrap_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The broker named by ``STREAMPROC_BOOTSTRAP``, if any."""
    env = os.environ if environ is None else environ
    value = env.get(f"{ENV_PREFIX}BOOTSTRAP", "").strip()
    return value or None


@dataclass(frozen=True)
class TopicNames:
    """Which topics a worker reads and writes (defaults match ``topics/``)."""

    requests: tuple[str, ...] = ("streamproc.requests.default",)
    """Request lanes, highest priority first."""
    responses: str = "streamproc.responses"
    """Default reply topic for requests that name none."""
    dead_letter: str = "streamproc.dead-letter"
    """Where undecodable messages go, with the reason and original bytes."""
    status: str = "streamproc.status"
    """Where workers report throughput and load, for lag estimates and producers."""
    allowed_reply_topics: tuple[str, ...] = ()
    """Extra reply topics a request may name; ``responses`` is always allowed."""

    def reply_allowed(self, topic: str) -> bool:
        return topic == self.responses or topic in self.allowed_reply_topics


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; each field documents itself."""

    bootstrap: str = DEFAULT_BOOTSTRAP
    """Kafka bootstrap servers, ``host:port[,host:port]``."""
    group_id: str = "streamproc-workers"
    """Consumer group shared by every worker serving the same lanes."""
    topics: TopicNames = field(default_factory=TopicNames)
    model: str = ""
    """Hugging Face hub id or local directory of a causal LM."""
    device: Device = "auto"
    """``auto`` picks CUDA when present, else CPU."""
    max_batch_size: int = 32
    """Most sequences decoding together."""
    max_batch_tokens: int = 4096
    """Most prompt tokens prefilled in one step (budget in tokens, not requests)."""
    batch_window_ms: float = 10.0
    """How long to gather new arrivals before their prefill when the engine is idle."""
    max_new_tokens_cap: int = 1024
    """Upper bound on any request's ``max_new_tokens``."""
    max_inflight: int = 256
    """Most requests held by the worker (waiting + running); beyond it fetching pauses."""
    max_inflight_tokens: int = 262_144
    """Most prompt + max-new tokens held; beyond it fetching pauses (bounds KV memory)."""
    status_interval_s: float = 2.0
    """How often the worker reports its throughput and load on the status topic."""
    lag_interval_s: float = 5.0
    """How often the worker refreshes its group's lag for its metrics."""
    metrics_port: int = 0
    """Serve Prometheus metrics on this port (0: no metrics endpoint)."""
    metrics_address: str = "127.0.0.1"
    """Address the metrics endpoint binds; set 0.0.0.0 inside a container."""
    commit_interval_s: float = 0.5
    """How often done offsets are committed."""
    drain_timeout_s: float = 30.0
    """On shutdown, how long running requests may take to finish before being handed back."""
    max_message_bytes: int = 1_000_000
    """Larger request messages go to the dead-letter topic unread."""

    def __post_init__(self) -> None:
        self._check_positive("max_batch_size", "max_batch_tokens", "max_new_tokens_cap")
        self._check_positive("max_inflight", "max_message_bytes", "max_inflight_tokens",
                             "status_interval_s", "lag_interval_s")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0 (off) or a port, got {self.metrics_port}")
        if self.batch_window_ms < 0 or self.commit_interval_s <= 0 or self.drain_timeout_s < 0:
            raise ConfigError("batch_window_ms, drain_timeout_s must be >= 0 and "
                              "commit_interval_s > 0")
        if self.max_inflight < self.max_batch_size:
            raise ConfigError(
                f"max_inflight ({self.max_inflight}) must be at least max_batch_size "
                f"({self.max_batch_size}), or the batch could never fill"
            )
        if not self.topics.requests:
            raise ConfigError("at least one request topic is needed")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> WorkerConfig:
        """Defaults, then ``STREAMPROC_<FIELD>`` variables, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and f.name != "topics":
                values[f.name] = _parse(f.name, raw, type(getattr(cls(), f.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") \
            from exc
