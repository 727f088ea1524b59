"""The one adapter from plain stats to Prometheus metrics.

A custom collector reads :class:`WorkerStats`, the worker's live gauges and the
latest lag report at scrape time; nothing on the hot path touches
prometheus_client. The registry is passed in, so tests and embedders own it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamproc.flow.lag import Status
from streamproc.metrics.lag_monitor import LagReport
from streamproc.metrics.stats import Histogram, WorkerStats

_STATUSES: tuple[Status, ...] = ("OK", "WARN", "STALL", "STOP")
_HISTOGRAMS = {
    "ttft": ("time_to_first_token_seconds", "From the producer's submit to the first token."),
    "inter_token": ("inter_token_latency_seconds", "Between successive tokens of a request."),
    "e2e": ("end_to_end_latency_seconds", "From the producer's submit to the last token."),
    "kafka_wait": ("kafka_wait_seconds", "From the producer's submit until the worker read it."),
    "engine_queue": ("engine_queue_seconds", "From read to admission into the running batch."),
    "prefill": ("prefill_seconds", "Prefill time of one engine step."),
    "decode_step": ("decode_step_seconds", "Decode time of one engine step."),
    "batch_sequences": ("batch_sequences", "Sequences in the running batch after a step."),
    "batch_tokens": ("batch_tokens", "Real tokens held in the KV cache after a step."),
}


@dataclass(frozen=True)
class LiveGauges:
    """Point-in-time readings from the worker, taken at scrape time."""

    running: int
    waiting: int
    inflight_requests: int
    inflight_tokens: int
    kv_cache_tokens: int
    batch_window_s: float
    admission_size: int
    running_cap: int
    chunk_interval_s: float
    paused_partitions: int
    gpu_memory_bytes: dict[str, int]


class WorkerCollector(Collector):
    def __init__(self, stats: WorkerStats, gauges: Callable[[], LiveGauges],
                 lag: Callable[[], LagReport | None]) -> None:
        self._stats = stats
        self._gauges = gauges
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        for attribute, (name, doc) in _HISTOGRAMS.items():
            yield _histogram(f"streamproc_{name}", doc, getattr(self._stats, attribute))
        yield from self._live()
        report = self._lag()
        if report is not None:
            yield from _lag_metrics(report)

    def _counters(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily("streamproc_requests", "Requests by how they ended.",
                                       labels=["outcome"])
        for outcome, count in sorted(self._stats.outcomes.items()):
            outcomes.add_metric([outcome], count)
        yield outcomes
        stats, prefix = self._stats, self._stats.prefix
        counters = [
            ("generated_tokens", "Tokens generated.", stats.tokens_generated),
            ("chunks_published", "Token chunks published.", stats.chunks_published),
            ("chunk_tokens_published", "Tokens in published chunks (per chunk: how much "
             "coalescing merged).", stats.chunk_tokens_published),
            ("duplicate_requests", "Jobs whose request id was already read at another "
             "offset of the partition (a producer's retry): not served twice.",
             stats.duplicates),
            ("prefix_lookup_tokens", "Prompt tokens looked up in the prefix cache.",
             prefix.lookup_tokens),
            ("prefix_hit_tokens", "Prompt tokens whose keys and values came from the prefix "
             "cache (not computed).", prefix.hit_tokens),
            ("prefix_evictions", "Blocks evicted from the prefix cache.", prefix.evictions),
            ("oom_retries", "Running requests put back after an out-of-memory step, to run "
             "again in a smaller batch.", stats.oom_retries),
            ("takeovers", "Requests taken over from an attempt that had started them "
             "(resumed from what it published).", stats.takeovers),
            ("takeover_records_read", "Reply records read to learn where taken-over streams "
             "stood.", stats.takeover_records_read),
            ("takeover_seconds", "Time spent claiming taken-over requests and reading their "
             "streams back.", stats.takeover_seconds),
            ("mark_wait_seconds", "Time streams' first messages waited for their record's "
             "attempts mark to be acknowledged.", stats.mark_wait_seconds),
            ("streams_opened", "Streams begun.", stats.streams_opened),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"streamproc_{name}", doc, value=value)
        yield GaugeMetricFamily("streamproc_prefix_cached_bytes",
                                "Bytes of keys and values the prefix cache holds.",
                                value=prefix.cached_bytes)
        changes = CounterMetricFamily("streamproc_window_adjustments",
                                      "Adaptive-window decisions, by reason.", labels=["reason"])
        for reason, count in sorted(self._stats.window_changes.items()):
            changes.add_metric([reason], count)
        yield changes
        yield GaugeMetricFamily("streamproc_tokens_per_second",
                                "Generated tokens per second of busy engine time.",
                                value=self._stats.rate.tokens_per_s)

    def _live(self) -> Iterator[Metric]:
        g = self._gauges()
        for name, doc, value in [
            ("running_requests", "Requests in the running batch.", g.running),
            ("waiting_requests", "Requests read and waiting for admission.", g.waiting),
            ("inflight_requests", "Records held (waiting, running, publishing).",
             g.inflight_requests),
            ("inflight_tokens", "Prompt + max-new tokens held.", g.inflight_tokens),
            ("kv_cache_tokens", "Real tokens in the KV cache.", g.kv_cache_tokens),
            ("batch_window_seconds", "Current admission window.", g.batch_window_s),
            ("admission_size", "Most requests admitted at once now.", g.admission_size),
            ("running_cap", "Most sequences allowed to decode together now.", g.running_cap),
            ("chunk_interval_seconds", "Least time between a stream's chunks now (pacing).",
             g.chunk_interval_s),
            ("paused_partitions", "Partitions paused for backpressure.", g.paused_partitions),
        ]:
            yield GaugeMetricFamily(f"streamproc_{name}", doc, value=value)
        if g.gpu_memory_bytes:
            gpu = GaugeMetricFamily("streamproc_gpu_memory_bytes", "CUDA memory of the worker.",
                                    labels=["kind"])
            for kind, value in g.gpu_memory_bytes.items():
                gpu.add_metric([kind], value)
            yield gpu


def _histogram(name: str, doc: str, stat: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=stat.cumulative(), sum_value=stat.total)


def _lag_metrics(report: LagReport) -> Iterator[Metric]:
    labels = ["group", "topic", "partition"]
    lag = GaugeMetricFamily("streamproc_consumer_lag", "Records not yet committed.",
                            labels=labels)
    age = GaugeMetricFamily("streamproc_oldest_unprocessed_age_seconds",
                            "Age of the oldest record not yet committed.", labels=labels)
    drain = GaugeMetricFamily("streamproc_lag_drain_seconds",
                              "Estimated time to work off the lag (absent when unknown).",
                              labels=labels)
    for p in report.partitions:
        key = [report.group_id, p.topic, str(p.partition)]
        lag.add_metric(key, p.lag)
        age.add_metric(key, p.oldest_age_s)
        if not math.isinf(p.drain_s):
            drain.add_metric(key, p.drain_s)
    status = GaugeMetricFamily("streamproc_group_status", "1 for the group's current status.",
                               labels=["group", "status"])
    for name in _STATUSES:
        status.add_metric([report.group_id, name], 1.0 if report.status == name else 0.0)
    yield from (lag, age, drain, status)


def serve(registry: CollectorRegistry, address: str, port: int) -> Any:
    """Serve ``/metrics`` on a background thread; returns the server (``shutdown()``)."""
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
