"""Replaying one trace through real Kafka against every peer, in one run.

Each peer gets fresh topics and the same trace and runs in its own process
(:mod:`streamproc.devtools.bench.serve`); the client, here, measures every request on its
own clock. The offline ceiling runs ``generate()`` here with no Kafka.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import torch

from streamproc import topics
from streamproc.client import StreamprocClient
from streamproc.config import TopicNames, WorkerConfig
from streamproc.devtools.bench import shared_workload
from streamproc.devtools.bench.load import replay
from streamproc.devtools.bench.long_prompts import LONG_PROMPT, ROUNDS, RUNNING, compare_chunk_sizes
from streamproc.devtools.bench.measure import Observation, summarize
from streamproc.devtools.bench.offload import off_loop
from streamproc.devtools.bench.paired import PairedCeiling
from streamproc.devtools.bench.peers import offline_ceiling, offline_engine
from streamproc.devtools.bench.serve import READY, Peer, PeerSpec
from streamproc.devtools.bench.settings import BenchSettings
from streamproc.devtools.bench.shared_workload import shared_prefix_report, shared_prefix_trace
from streamproc.devtools.bench.targets import long_prompt_ratios, targets
from streamproc.devtools.bench.trace import (
    Arrival,
    build,
    rendered,
)
from streamproc.engine.loader import LoadedModel
from streamproc.engine.threads import serving_threads, usable_cores
from streamproc.metrics.stats import percentile
from streamproc.metrics.trace import as_columns, read_trace

Progress = Callable[[str], None]
AfterTrace = Callable[[StreamprocClient], Awaitable[None]]
"""Run against a peer that has served the trace, before it stops, with the trace's client."""
PEERS = ("naive", "fixed_window", "streamproc", "streamproc_throughput")
"""``streamproc`` runs under the inter-token target (latency mode), ``streamproc_throughput``
with none (throughput mode)."""
PAIRED_PEER = "streamproc_throughput"
"""The peer the paired rounds run against, after its trace."""
PEER_START_TIMEOUT_S = 120.0
TICK_S = 10.0
"""How often a replay says how far it has got."""
SMALL_CHUNK = 128
"""Beside the default chunk size, a small one, for how far chunks smooth the steps."""
SAMPLED = (0.8, 0.95)
"""Temperature and top-p of the sampled engine run, as a chat application might ask."""


async def run_bench(bootstrap: str, loaded: LoadedModel, model_dir: str,
                    settings: BenchSettings, progress: Progress) -> dict[str, Any]:
    trace = build(settings.trace)
    if settings.trace.chat:
        trace = rendered(trace, loaded.tokenizer)
    progress(f"trace: {len(trace)} requests, {settings.trace.max_new_tokens} tokens each")
    prompts = [a.prompt for a in trace[:64]]
    paired = _paired_ceiling(loaded, prompts, trace, settings)
    pairing = _announced(paired, progress) if settings.paired_rounds > 0 else None
    with tempfile.TemporaryDirectory(prefix="streamproc-bench-") as traces:
        observations = await replay_peers(bootstrap, model_dir, trace, settings, progress,
                                          after_paired_peer=pairing, trace_dir=Path(traces))
        controller = {name: as_columns(read_trace(Path(traces) / f"{name}.jsonl"))
                      for name in PEERS if name.startswith("streamproc")}
    runs: dict[str, Any] = {name: _summaries(o, settings) for name, o in observations.items()}
    runs.update(await _offline_runs(loaded, prompts, settings, progress, paired.sweep))
    pairs = paired.report(settings.ttft_target_s, settings.itl_target_s)
    report = targets(runs, settings.itl_target_s * 1000, pairs)
    long_prompts = await _long_prompt_runs(loaded, progress) if settings.extras else {}
    if long_prompts:
        report["ratios"].update(long_prompt_ratios(long_prompts))
    return {"model": describe(loaded, model_dir), "runs": runs, "targets": report,
            "long_prompts": long_prompts, "paired": pairs,
            "settings": {"trace": settings.trace.__dict__, "ttft_target_ms":
                         settings.ttft_target_s * 1000, "itl_target_ms":
                         settings.itl_target_s * 1000, "max_batch_size":
                         settings.max_batch_size, "fixed_batch": settings.fixed_batch,
                         "fixed_window_ms": settings.fixed_window_s * 1000,
                         "cpu_threads": {name: peer_threads(name, settings)
                                         for name in PEERS}},
            "timelines": {n: _timeline(o) for n, o in observations.items()},
            "controller": controller}


def peer_threads(name: str, settings: BenchSettings) -> int:
    """The torch CPU threads a peer runs on (on a GPU they only drive it)."""
    itl_target_ms = 0.0 if name == "streamproc_throughput" else settings.itl_target_s * 1000
    requested = WorkerConfig(itl_target_ms=itl_target_ms,
                             cpu_threads=settings.cpu_threads).torch_threads
    return serving_threads(requested, usable_cores())


def describe(loaded: LoadedModel, model_dir: str) -> dict[str, Any]:
    """What the report says of the model: where it came from, its size, how it ran."""
    parameters = sum(p.numel() for p in loaded.model.parameters())
    return {"name": model_dir, "parameters": parameters, "dtype": str(loaded.dtype),
            "device": str(loaded.device)}


def _paired_ceiling(loaded: LoadedModel, prompts: list[str], trace: list[Arrival],
                    settings: BenchSettings) -> PairedCeiling:
    return PairedCeiling(loaded, prompts, [a for a in trace if a.phase == "saturation"],
                         settings.trace.max_new_tokens, settings.ceiling_batch_sizes,
                         settings.paired_rounds, settings.drain_timeout_s,
                         sweep_batches=settings.ceiling_batches,
                         paired_batches=settings.paired_ceiling_batches)


def _announced(paired: PairedCeiling, progress: Progress) -> AfterTrace:
    async def measure(client: StreamprocClient) -> None:
        progress(f"offline ceiling: generate() alone at batch sizes "
                 f"{', '.join(map(str, paired.batch_sizes))}")
        await paired.sweep_sizes(progress)
        progress(f"[{PAIRED_PEER}] {paired.rounds} more saturation waves of "
                 f"{len(paired.wave)}, each between two runs of generate() at batch size "
                 f"{paired.batch_size}")
        await paired.measure(client, progress)
    return measure


async def replay_peers(bootstrap: str, model_dir: str, trace: list[Arrival],
                       settings: BenchSettings, progress: Progress, *,
                       after_paired_peer: AfterTrace | None = None,
                       trace_dir: Path | None = None) -> dict[str, list[Observation]]:
    """Each peer in turn, in a process of its own and on fresh topics, serving ``trace``:
    every request as the client saw it. ``after_paired_peer`` runs once
    :data:`PAIRED_PEER` has served the trace, before it stops; with ``trace_dir``,
    streamproc's peers write their step traces there (``NAME.jsonl``)."""
    observations: dict[str, list[Observation]] = {}
    for name in PEERS:
        # What the bench process holds so far (the model, earlier runs' observations) leaves
        # the collector's reach: a full collection over it stalled this client's event loop
        # for up to a quarter of a second mid-run, which the peer being measured would wear.
        gc.collect()
        gc.freeze()
        names = await _fresh_topics(bootstrap)
        trace_file = str(trace_dir / f"{name}.jsonl") if trace_dir else ""
        peer = _make_peer(name, bootstrap, names, model_dir, settings, trace_file)
        after = after_paired_peer if name == PAIRED_PEER else None
        observations[name] = await _replay(name, peer, bootstrap, names, trace, settings,
                                           progress, after)
    return observations


async def run_shared_prefix(bootstrap: str, loaded: LoadedModel, model_dir: str,
                            settings: BenchSettings, progress: Progress) -> dict[str, Any]:
    """The shared-prefix workload (:mod:`streamproc.devtools.bench.shared_workload`) through
    every one of its peers in turn, each in its own process on fresh topics."""
    trace = shared_prefix_trace(loaded.tokenizer, settings.shared_prefix)
    prompt_tokens = len(loaded.tokenizer(trace[0].prompt).input_ids)
    progress(f"shared prefix: {len(trace)} records at once, prompts of about "
             f"{prompt_tokens} tokens, {settings.shared_prefix.new_tokens} new tokens each")
    runs: dict[str, Any] = {}
    for name in shared_workload.PEERS:
        gc.collect()
        gc.freeze()
        names = await _fresh_topics(bootstrap)
        cache = 0 if name == shared_workload.CACHE_OFF else None
        peer = _make_peer(name, bootstrap, names, model_dir, settings,
                          prefix_cache_bytes=cache)
        observations = await _replay(f"shared prefix: {name}", peer, bootstrap, names, trace,
                                     settings, progress, None)
        runs[name] = summarize(observations, settings.ttft_target_s, settings.itl_target_s)
    return shared_prefix_report(runs)


async def _offline_runs(loaded: LoadedModel, prompts: list[str], settings: BenchSettings,
                        progress: Progress, sweep: dict[str, float]) -> dict[str, Any]:
    """The ceiling (``sweep``, if it was measured beside streamproc) and the engine alone,
    with no Kafka, in this process."""
    runs: dict[str, Any] = {}
    new_tokens, batch = settings.trace.max_new_tokens, settings.max_batch_size
    if not sweep:
        progress("offline ceiling: generate() alone at several batch sizes")
        sweep = await off_loop(offline_ceiling, loaded, prompts, new_tokens,
                               settings.ceiling_batch_sizes, batches=settings.ceiling_batches)
    runs["offline_ceiling"] = _ceiling_run(sweep)
    progress("offline engine: streamproc's engine alone, no Kafka")
    engine_rate = await off_loop(offline_engine, loaded, prompts, new_tokens, batch)
    runs["offline_engine"] = _ceiling_run({str(batch): engine_rate})
    if not settings.extras:
        return runs
    progress(f"offline engine sampling (temperature {SAMPLED[0]:g}, top-p {SAMPLED[1]:g})")
    sampled_rate = await off_loop(offline_engine, loaded, prompts, new_tokens, batch,
                                  temperature=SAMPLED[0], top_p=SAMPLED[1])
    runs["offline_engine_sampled"] = _ceiling_run({str(batch): sampled_rate})
    threads = serving_threads(0, usable_cores())
    if loaded.device.type == "cpu" and threads != torch.get_num_threads():
        progress(f"offline engine on {threads} CPU thread(s), as a worker here serves")
        served_rate = await off_loop(offline_engine, loaded, prompts, new_tokens,
                                     batch, threads)
        runs["offline_engine_worker_threads"] = _ceiling_run({str(batch): served_rate})
    return runs


async def _long_prompt_runs(loaded: LoadedModel, progress: Progress) -> dict[str, Any]:
    """The engine alone with long prompts joining: prefilled whole, in a worker's default
    chunks, and in small ones, taking turns."""
    sizes = (0, WorkerConfig().prefill_chunk_tokens, SMALL_CHUNK)
    progress(f"long prompts: {LONG_PROMPT} tokens joining {RUNNING} running, prefilled whole "
             f"and in chunks of {sizes[1]} and {sizes[2]}, {ROUNDS} rounds")
    return await off_loop(compare_chunk_sizes, loaded, sizes)


class PeerProcess:
    """A peer served by ``python -m streamproc.devtools.bench.serve`` in a child process."""

    def __init__(self, spec: PeerSpec) -> None:
        self._spec = spec
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamproc.devtools.bench.serve",
            msgspec.json.encode(self._spec).decode(), stdout=asyncio.subprocess.PIPE)
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), PEER_START_TIMEOUT_S)
        if line.decode().strip() != READY:
            await self.stop()
            raise RuntimeError(f"bench peer {self._spec.name} did not start "
                               f"(exit {self._process.returncode})")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), PEER_START_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()


def _make_peer(name: str, bootstrap: str, names: TopicNames, model_dir: str,
               settings: BenchSettings, trace_file: str = "",
               prefix_cache_bytes: int | None = None) -> Peer:
    itl_target_s = 0.0 if name == "streamproc_throughput" else settings.itl_target_s
    return PeerProcess(PeerSpec(name, bootstrap, names, model_dir, settings.ttft_target_s,
                                itl_target_s, settings.fixed_window_s, settings.fixed_batch,
                                settings.max_batch_size,
                                trace_file if name.startswith("streamproc") else "",
                                settings.cpu_threads, prefix_cache_bytes))


async def _fresh_topics(bootstrap: str) -> TopicNames:
    suffix = uuid.uuid4().hex[:8]
    specs = topics.suffixed(topics.load_specs(), f"bench-{suffix}", replication_factor=1)
    await topics.apply(bootstrap, specs)
    return topics.topic_names(specs)


async def _replay(name: str, peer: Peer, bootstrap: str, names: TopicNames,
                  trace: list[Arrival], settings: BenchSettings,
                  progress: Progress, after: AfterTrace | None) -> list[Observation]:
    await peer.start()
    lane = names.requests[-1]
    try:
        async with StreamprocClient(bootstrap, request_topic=lane,
                                    reply_topic=names.responses) as client:
            progress(f"[{name}] replaying {len(trace)} requests")
            started = time.monotonic()
            observations = await replay(client, trace, settings.drain_timeout_s,
                                        tick=_ticker(name, len(trace), started, progress),
                                        tick_s=TICK_S)
            finished = sum(o.finished is not None for o in observations)
            progress(f"[{name}] {finished}/{len(trace)} completed in "
                     f"{time.monotonic() - started:.1f}s")
            if after is not None:
                await after(client)
            return observations
    finally:
        await peer.stop()


def _ticker(name: str, total: int, started: float,
            progress: Progress) -> Callable[[list[Observation]], None]:
    """Says, every :data:`TICK_S`, how many of the trace's requests have been submitted and
    completed."""
    def tick(observations: list[Observation]) -> None:
        done = sum(o.finished is not None for o in observations)
        progress(f"[{name}] {time.monotonic() - started:.0f}s: {len(observations)}/{total} "
                 f"submitted, {done} completed")
    return tick


def _summaries(observations: list[Observation], settings: BenchSettings) -> dict[str, Any]:
    def by(phases: Callable[[str], bool]) -> dict[str, Any]:
        return summarize([o for o in observations if phases(o.phase)], settings.ttft_target_s,
                         settings.itl_target_s)
    run = by(lambda p: True)
    run["steady"] = by(lambda p: p.startswith("steady"))
    run["burst"] = by(lambda p: p == "burst")
    run["saturation"] = by(lambda p: p == "saturation")
    run["burst_and_wave"] = by(lambda p: p in ("burst", "saturation"))
    run["saturated_tokens_per_s"] = run["saturation"]["tokens_per_s"]
    run["phases"] = {p: by(p.__eq__) for p in sorted({o.phase for o in observations})}
    return run


def _ceiling_run(rates: dict[str, float]) -> dict[str, Any]:
    best = max(rates.values())
    latency = dict.fromkeys(("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms",
                             "itl_p95_ms", "itl_p99_ms", "e2e_p99_ms"))
    return {"tokens_per_s": best, "saturated_tokens_per_s": best, "by_batch_size": rates,
            "requests": 0, "completed": 0, "lost": 0, **latency}


def _timeline(observations: list[Observation]) -> list[list[float]]:
    """[submit offset s, ttft ms, itl p95 ms] per request, for the chart."""
    if not observations:
        return []
    start = min(o.submitted for o in observations)
    rows = []
    for o in observations:
        if o.first_token is None:
            continue
        rows.append([o.submitted - start, (o.first_token - o.submitted) * 1000,
                     percentile(o.gaps, 95) * 1000])
    return rows
