"""Metrics as Prometheus sees them: the collector, a real server, the alert rules."""

from __future__ import annotations

import asyncio
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from streamproc import wire
from streamproc.client import StreamprocClient
from streamproc.config import WorkerConfig
from streamproc.devtools.localkafka import free_port
from streamproc.engine.loader import LoadedModel
from streamproc.worker.app import Worker

from .helpers import eventually
from .prometheus_server import PrometheusServer, prometheus_binaries

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "end_to_end_latency_seconds", "kafka_wait_seconds", "engine_queue_seconds",
              "prefill_seconds", "decode_step_seconds", "batch_sequences", "batch_tokens"]


async def serve_some(config: WorkerConfig, count: int = 6) -> None:
    async with StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                                reply_topic=config.topics.responses) as client:
        streams = [await client.submit(f"metrics {i}",
                                       params=wire.GenerationParams(max_new_tokens=5))
                   for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 60)
    await client.stop()


def sample_value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not exposed"
    return float(match.group(1))


@pytest.mark.kafka
@pytest.mark.model
async def test_collector_exposes_outcomes_latencies_gauges_and_lag(
        worker: Worker, worker_config: WorkerConfig) -> None:
    await serve_some(worker_config)
    await eventually(lambda: worker.lag is not None and worker.lag.lag == 0)
    text = generate_latest(worker.registry).decode()
    completed = sum(sample_value(text, "streamproc_requests_total", f'{{outcome="{o}"}}')
                    for o in ("length", "stop") if f'outcome="{o}"' in text)
    assert completed == 6
    generated = sample_value(text, "streamproc_generated_tokens_total")
    assert generated >= 6
    chunks = sample_value(text, "streamproc_chunks_published_total")
    assert 6 <= chunks <= generated  # at least one chunk per request, at most one per token
    assert sample_value(text, "streamproc_chunk_tokens_published_total") == generated
    for name in HISTOGRAMS:
        assert sample_value(text, f"streamproc_{name}_count") > 0, name
    ttft_sum = sample_value(text, "streamproc_time_to_first_token_seconds_sum")
    e2e_sum = sample_value(text, "streamproc_end_to_end_latency_seconds_sum")
    assert 0 < ttft_sum <= e2e_sum
    assert sample_value(text, "streamproc_running_requests") == 0
    assert sample_value(text, "streamproc_admission_size") == worker.policy.admit_size >= 1
    assert sample_value(text, "streamproc_running_cap") == worker.policy.running_cap >= 1
    assert sample_value(text, "streamproc_batch_window_seconds") == worker.policy.window_s
    assert sample_value(text, "streamproc_tokens_per_second") > 0
    lane = worker_config.topics.requests[0]
    lag_labels = f'{{group="{worker_config.group_id}",partition="0",topic="{lane}"}}'
    assert sample_value(text, "streamproc_consumer_lag", lag_labels) == 0
    status = f'{{group="{worker_config.group_id}",status="OK"}}'
    assert sample_value(text, "streamproc_group_status", status) == 1
    assert sample_value(text, "streamproc_streams_opened_total") == 6
    assert sample_value(text, "streamproc_mark_wait_seconds_total") >= 0
    assert sample_value(text, "streamproc_takeovers_total") == 0
    assert sample_value(text, "streamproc_prefix_lookup_tokens_total") >= 6


@pytest.mark.kafka
@pytest.mark.model
async def test_a_shared_instruction_shows_as_prefix_cache_hits(
        worker: Worker, worker_config: WorkerConfig) -> None:
    instruction = "Kafka holds the backlog while workers stream tokens. " * 4
    async with StreamprocClient(worker_config.bootstrap,
                                request_topic=worker_config.topics.requests[0],
                                reply_topic=worker_config.topics.responses) as client:
        for i in range(3):  # one after another: the second stores, the third hits
            await asyncio.wait_for(client.generate(
                f"{instruction} record {i}", params=wire.GenerationParams(max_new_tokens=3)),
                60)
    text = generate_latest(worker.registry).decode()
    assert sample_value(text, "streamproc_prefix_hit_tokens_total") >= 32
    assert sample_value(text, "streamproc_prefix_cached_bytes") > 0


@pytest.mark.kafka
@pytest.mark.model
async def test_a_real_prometheus_scrapes_lag_and_latency(
        worker_config: WorkerConfig, loaded_model: LoadedModel, tmp_path: Path) -> None:
    port = free_port()
    config = replace(worker_config, metrics_port=port)
    running = Worker(config, loaded_model)
    await running.start()
    prometheus_bin, _ = prometheus_binaries()
    server = PrometheusServer(prometheus_bin, tmp_path, free_port(), f"127.0.0.1:{port}")
    try:
        await serve_some(config)
        lag = await asyncio.to_thread(server.wait_for,
                                      f'streamproc_consumer_lag{{group="{config.group_id}"}}')
        assert {s["metric"]["partition"] for s in lag} == {"0", "1", "2", "3"}
        p95 = await asyncio.to_thread(
            server.wait_for, "histogram_quantile(0.95, sum by (le) "
            "(streamproc_time_to_first_token_seconds_bucket)) > 0")
        assert float(p95[0]["value"][1]) > 0
        done = await asyncio.to_thread(server.wait_for,
                                       'sum(streamproc_requests_total{outcome=~"stop|length"})')
        assert float(done[0]["value"][1]) == 6
    finally:
        server.stop()
        await running.stop()


def test_promtool_accepts_the_alert_rules_and_the_config(tmp_path: Path) -> None:
    _, promtool = prometheus_binaries()
    rules = DEPLOY / "prometheus" / "alerts.yml"
    checked = subprocess.run([str(promtool), "check", "rules", str(rules)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    # The config names the rules where the container mounts them; point it here instead.
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/alerts.yml", str(rules)))
    checked = subprocess.run([str(promtool), "check", "config", str(local)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
