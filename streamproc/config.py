"""Frozen, documented configuration, read from the environment in one place.

Nothing reads the environment at import time: :func:`WorkerConfig.from_env`
is the only door, and the CLI passes its flags on top of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context

from streamproc.engine.threads import usable_cores
from streamproc.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_LANE = "streamproc.requests.default"
"""Where jobs go unless their producer picks another lane."""
ENV_PREFIX = "STREAMPROC_"
DEFAULT_MODEL = "smollm2-135m-instruct"
"""A real chat model fetched from the package index on first use (see ``streamproc model``)."""
DEFAULT_PREFILL_CHUNK_TOKENS = 512
"""The engine's and the worker's default for :attr:`WorkerConfig.prefill_chunk_tokens`."""
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
"""The engine's and the worker's default for :attr:`WorkerConfig.prefix_cache_bytes`."""


def bootstrap_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The broker named by ``STREAMPROC_BOOTSTRAP``, if any."""
    env = os.environ if environ is None else environ
    value = env.get(f"{ENV_PREFIX}BOOTSTRAP", "").strip()
    return value or None


Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How clients authenticate and encrypt; passed to every aiokafka client.

    Secrets come from ``STREAMPROC_SASL_PASSWORD`` or the file named by
    ``STREAMPROC_SASL_PASSWORD_FILE``; they are kept out of ``repr`` (so out of
    logs) and never exported as metrics.
    """

    protocol: Protocol = "PLAINTEXT"
    sasl_mechanism: Mechanism = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ConfigError(f"security protocol must be one of {_PROTOCOLS}")
        if self.sasl_mechanism not in _MECHANISMS:
            raise ConfigError(f"SASL mechanism must be one of {_MECHANISMS}")
        if self.protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ConfigError(f"{self.protocol} needs STREAMPROC_SASL_USERNAME and "
                              "STREAMPROC_SASL_PASSWORD (or STREAMPROC_SASL_PASSWORD_FILE)")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r} is not a readable file")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
        env = os.environ if environ is None else environ
        password = env.get(f"{ENV_PREFIX}SASL_PASSWORD", "")
        password_file = env.get(f"{ENV_PREFIX}SASL_PASSWORD_FILE", "")
        if password_file:
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read STREAMPROC_SASL_PASSWORD_FILE: {exc}") from exc
        return cls(
            protocol=env.get(f"{ENV_PREFIX}SECURITY_PROTOCOL", "PLAINTEXT").upper(),  # type: ignore[arg-type]
            sasl_mechanism=env.get(f"{ENV_PREFIX}SASL_MECHANISM", "PLAIN").upper(),  # type: ignore[arg-type]
            sasl_username=env.get(f"{ENV_PREFIX}SASL_USERNAME", ""),
            sasl_password=password,
            ssl_cafile=env.get(f"{ENV_PREFIX}SSL_CAFILE", ""),
            ssl_certfile=env.get(f"{ENV_PREFIX}SSL_CERTFILE", ""),
            ssl_keyfile=env.get(f"{ENV_PREFIX}SSL_KEYFILE", ""),
        )

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism,
                           sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        if self.protocol.endswith("SSL"):
            options["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile or None, certfile=self.ssl_certfile or None,
                keyfile=self.ssl_keyfile or None)
        return options


@dataclass(frozen=True)
class TopicNames:
    """Which topics a worker reads and writes (defaults match ``topics/``)."""

    requests: tuple[str, ...] = ("streamproc.requests.high", "streamproc.requests.default")
    """Request lanes, highest priority first."""
    responses: str = "streamproc.responses"
    """Default reply topic for requests that name none."""
    dead_letter: str = "streamproc.dead-letter"
    """Where undecodable messages go, with the reason and original bytes."""
    status: str = "streamproc.status"
    """Where workers report throughput and load, for lag estimates and producers."""
    control: str = "streamproc.control"
    """Where cancellations go; every worker reads all of it."""
    attempts: str = "streamproc.attempts"
    """Compacted: which records a worker started, and how many times each was running when
    its worker died (takeovers and poison detection survive the crash)."""
    allowed_reply_topics: tuple[str, ...] = ()
    """Extra reply topics a request may name; ``responses`` is always allowed."""
    allowed_reply_pattern: str = ""
    """A regular expression reply topics may also fully match (empty: none)."""

    def reply_allowed(self, topic: str) -> bool:
        if topic.startswith("__") or topic in (self.dead_letter, self.status, self.control,
                                               self.attempts,
                                               *self.requests):
            return False  # never Kafka's internal topics or streamproc's own
        if topic == self.responses or topic in self.allowed_reply_topics:
            return True
        return bool(self.allowed_reply_pattern) and \
            re.fullmatch(self.allowed_reply_pattern, topic) is not None


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; each field documents itself."""

    bootstrap: str = DEFAULT_BOOTSTRAP
    """Kafka bootstrap servers, ``host:port[,host:port]``."""
    group_id: str = "streamproc-workers"
    """Consumer group shared by every worker serving the same lanes."""
    topics: TopicNames = field(default_factory=TopicNames)
    model: str = DEFAULT_MODEL
    """A catalog name (``smollm2-135m-instruct``, ``tiny``), a ``.gguf`` file, a model
    directory or a Hugging Face hub id; catalog models and GGUF files are fetched and
    converted into the cache on first use."""
    device: Device = "auto"
    """``auto`` picks CUDA when present, else CPU."""
    cpu_threads: int = 0
    """On CPU, torch's kernel threads; 0: automatic (:attr:`torch_threads`). Set for the
    whole process that runs the engine (torch has one pool per process): the engine's
    own, or the worker's with ``engine_process`` off."""
    engine_process: bool = True
    """Run the engine in a process of its own, so the model's Python and the worker's
    Kafka I/O do not take turns on one interpreter lock; off: on a thread of the worker
    (one process, one copy of the model in memory)."""
    max_batch_size: int = 32
    """Most sequences decoding together."""
    max_batch_tokens: int = 4096
    """Most prompt tokens prefilled in one step (budget in tokens, not requests)."""
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    """Longer prompts are prefilled this many tokens a step, so the running sequences keep
    decoding meanwhile instead of waiting for the whole prompt; 0: every prompt at once."""
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    """Keys and values of prompt prefixes kept for later prompts that start the same way
    (a shared instruction, system prompt or examples is prefilled once); evicted least
    recently used beyond this many bytes; 0: off."""
    batch_window_ms: float = 10.0
    """Fixed policy: how long an idle engine gathers arrivals."""
    batch_policy: str = "adaptive"
    """``adaptive`` (window and admission size follow latency) or ``fixed``."""
    window_min_ms: float = 1.0
    """Adaptive policy: the shortest admission window (where it starts)."""
    window_max_ms: float = 100.0
    """Adaptive policy: the longest admission window."""
    ttft_target_ms: float = 1000.0
    """Adaptive policy: the time-to-first-token p95 to stay under."""
    itl_target_ms: float = 100.0
    """Adaptive policy: the inter-token latency p95 to stay under; the running batch and
    each step's admissions are sized from learned step costs to fit it. 0: no target
    (throughput mode: the batch runs as full as ``max_batch_size`` allows)."""
    max_new_tokens_cap: int = 1024
    """Upper bound on any request's ``max_new_tokens``."""
    max_inflight: int = 256
    """Most requests held by the worker (waiting + running); beyond it fetching pauses."""
    coalesce: bool = True
    """Merge a stream's new tokens into one chunk while its previous chunk is unacknowledged
    or went out within the pacing interval (see ``chunk_rate``)."""
    chunk_rate: float = 2000.0
    """Chunks per second the worker aims to publish over all its streams: a stream's
    chunks go out at most every (running streams / chunk_rate) seconds, and never more
    than half ``itl_target_ms`` apart. 0: no pacing."""
    linger_ms: int = 0
    """How long the producer waits to fill a batch of messages before sending it (0:
    send at once; messages queued while a send is in flight still leave together)."""
    lane_backlog: int = 32
    """Waiting requests in a lane above which fetching from lower lanes pauses."""
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
    close_timeout_s: float = 10.0
    """On shutdown after the drain, how long flushing, committing and closing the Kafka
    clients may take in all, so that a broker that is gone cannot keep the worker from
    exiting; likewise flushing and committing when partitions are revoked (what was not
    committed is served again by the partitions' next owner), and the longest any one
    commit may take (then it is given up, not retried later)."""
    max_message_bytes: int = 1_000_000
    """Larger request messages go to the dead-letter topic unread."""
    max_prompt_tokens: int = 8192
    """Longer prompts are refused (``prompt_too_long``) whatever the model's context."""
    kv_memory_bytes: int = 0
    """The running batch's keys and values are kept within this many bytes (rows times the
    widest prompt + max_new_tokens, at the model's bytes per token): admissions wait for
    room, and a request that could not fit alone is refused (``prompt_too_long``); 0: no
    bound. On a GPU, set it to what is free once the model is loaded, less headroom."""
    model_aliases: tuple[str, ...] = ()
    """More names a job's ``model`` may give for this worker's model, besides its own
    (``--model`` as given, its file or directory name, a catalog model's hub id); any other
    name is refused with ``model_not_found``."""
    kv_memory_fraction: float = 0.9
    """On a GPU, when ``kv_memory_bytes`` is 0: the budget is this fraction of the device
    memory free once the model is loaded and warm (0: no bound)."""
    allow_unsafe_weights: bool = False
    """Load pickle-based weight files (``.bin``); off: only safetensors, nothing unpickled."""
    trace_file: str = ""
    """Write every engine step and controller decision here as JSON lines (diagnosis;
    empty: off)."""
    poison_attempts: int = 3
    """A record that was running in the engine each of the last this many times its worker
    died is dead-lettered as ``poison`` (with an error reply) instead of served again."""
    reply_topic_pattern: str = ""
    """A regular expression of extra reply topics jobs may name (beyond ``topics``)."""
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @property
    def torch_threads(self) -> int:
        """:attr:`cpu_threads` as the engine applies it (0 there: one less than the cores).

        Automatic: under an inter-token target, one less than the usable cores, so
        consuming and publishing keep a core and never stall the kernels' barriers, and
        small batches (which a second thread does not speed up) keep steady step times.
        In throughput mode (``itl_target_ms`` 0), every core: on SmolLM2 a 64-row batch
        ran 1.5-1.75x faster on both of a 2-core machine's cores than on one."""
        if self.cpu_threads > 0:
            return self.cpu_threads
        return usable_cores() if self.itl_target_ms == 0 else 0

    def __post_init__(self) -> None:
        self._check_positive("max_batch_size", "max_batch_tokens", "max_new_tokens_cap")
        self._check_positive("max_inflight", "max_message_bytes", "max_inflight_tokens",
                             "poison_attempts",
                             "max_prompt_tokens", "lane_backlog",
                             "status_interval_s", "lag_interval_s")
        if not self.topics.attempts:
            raise ConfigError("an attempts topic is required: it is how a request's next "
                              "owner knows to take its stream over (declare one in topics/)")
        if self.linger_ms < 0:
            raise ConfigError("linger_ms must be >= 0")
        if self.chunk_rate < 0:
            raise ConfigError(f"chunk_rate must be >= 0 (0: no pacing), got {self.chunk_rate}")
        if self.kv_memory_bytes < 0:
            raise ConfigError(f"kv_memory_bytes must be >= 0 (0: no bound), got "
                              f"{self.kv_memory_bytes}")
        if not 0 <= self.kv_memory_fraction < 1:
            raise ConfigError(f"kv_memory_fraction must be in [0, 1), got "
                              f"{self.kv_memory_fraction}")
        if self.prefix_cache_bytes < 0:
            raise ConfigError(f"prefix_cache_bytes must be >= 0 (0: off), got "
                              f"{self.prefix_cache_bytes}")
        if self.prefill_chunk_tokens < 0:
            raise ConfigError("prefill_chunk_tokens must be >= 0 (0: no chunks), "
                              f"got {self.prefill_chunk_tokens}")
        if self.cpu_threads < 0:
            raise ConfigError(f"cpu_threads must be >= 0 (0: automatic), got {self.cpu_threads}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0 (off) or a port, got {self.metrics_port}")
        if min(self.batch_window_ms, self.drain_timeout_s, self.close_timeout_s) < 0 \
                or self.commit_interval_s <= 0:
            raise ConfigError("batch_window_ms, drain_timeout_s, close_timeout_s must be >= 0 "
                              "and commit_interval_s > 0")
        if self.max_inflight < self.max_batch_size:
            raise ConfigError(
                f"max_inflight ({self.max_inflight}) must be at least max_batch_size "
                f"({self.max_batch_size}), or the batch could never fill"
            )
        if not self.topics.requests:
            raise ConfigError("at least one request topic is needed")
        if self.batch_policy not in ("adaptive", "fixed"):
            raise ConfigError(f"batch_policy must be adaptive or fixed, got {self.batch_policy!r}")
        if self.ttft_target_ms <= 0 or self.itl_target_ms < 0:
            raise ConfigError("ttft_target_ms must be positive and itl_target_ms >= 0 "
                              "(0: no inter-token target)")
        if not 0 <= self.window_min_ms <= self.window_max_ms:
            raise ConfigError("window_min_ms must be >= 0 and at most window_max_ms")
        try:
            re.compile(self.reply_topic_pattern)
        except re.error as exc:
            raise ConfigError(f"reply_topic_pattern is not a regular expression: {exc}") \
                from exc

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
            if raw is not None and f.name not in ("topics", "security"):
                values[f.name] = _parse(f.name, raw, type(getattr(cls(), f.name)))
        values["security"] = KafkaSecurity.from_env(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _parse(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not true or false")
        return raw.lower() in ("1", "true", "yes")
    if kind is tuple:  # a comma-separated list
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") \
            from exc
