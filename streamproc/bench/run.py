"""Replaying one trace through real Kafka against every peer, in one run.

Each peer gets fresh topics and the same trace and runs in its own process
(:mod:`streamproc.bench.serve`); the client, here, measures every request on its
own clock. The offline ceiling runs ``generate()`` here with no Kafka.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from streamproc import topics
from streamproc.bench.load import replay
from streamproc.bench.long_prompts import LONG_PROMPT, ROUNDS, RUNNING, compare_chunk_sizes
from streamproc.bench.measure import Observation, summarize
from streamproc.bench.paired import PairedCeiling
from streamproc.bench.peers import offline_ceiling, offline_engine
from streamproc.bench.serve import READY, Peer, PeerSpec
from streamproc.bench.trace import Arrival, TraceSettings, build
from streamproc.client import StreamprocClient
from streamproc.config import TopicNames, WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.engine.threads import serving_threads, usable_cores
from streamproc.metrics.stats import percentile

Progress = Callable[[str], None]
AfterTrace = Callable[[StreamprocClient], Awaitable[None]]
"""Run against a peer that has served the trace, before it stops, with the trace's client."""
PEERS = ("naive", "fixed_window", "streamproc")
PEER_START_TIMEOUT_S = 120.0
SMALL_CHUNK = 128
"""Beside the default chunk size, a small one, for how far chunks smooth the steps."""
SAMPLED = (0.8, 0.95)
"""Temperature and top-p of the sampled engine run, as a chat application might ask."""


@dataclass(frozen=True)
class BenchSettings:
    trace: TraceSettings = field(default_factory=TraceSettings)
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.1
    fixed_window_s: float = 0.010
    fixed_batch: int = 32
    max_batch_size: int = 128
    """streamproc's largest decode batch; the ceiling is measured up to the same size."""
    drain_timeout_s: float = 180.0
    paired_rounds: int = 3
    """Saturation waves through streamproc after the trace, each between two ceiling runs
    (:mod:`streamproc.bench.paired`); 0: none, the target reads the trace's wave."""

    @property
    def ceiling_batch_sizes(self) -> tuple[int, ...]:
        return tuple(s for s in (8, 16, 32, 64, 128, 256) if s <= self.max_batch_size)


async def run_bench(bootstrap: str, loaded: LoadedModel, model_dir: str,
                    settings: BenchSettings, progress: Progress) -> dict[str, Any]:
    trace = build(settings.trace)
    progress(f"trace: {len(trace)} requests, {settings.trace.max_new_tokens} tokens each")
    prompts = [a.prompt for a in trace[:64]]
    paired = _paired_ceiling(loaded, prompts, trace, settings)
    pairing = _announced(paired, progress) if settings.paired_rounds > 0 else None
    observations = await replay_peers(bootstrap, model_dir, trace, settings, progress,
                                      after_streamproc=pairing)
    runs: dict[str, Any] = {name: _summaries(o, settings) for name, o in observations.items()}
    runs.update(await _offline_runs(loaded, prompts, settings, progress, paired.sweep))
    long_prompts = await _long_prompt_runs(loaded, progress)
    pairs = paired.report(settings.ttft_target_s, settings.itl_target_s)
    targets = _targets(runs, settings, pairs)
    targets["ratios"].update(_long_prompt_ratios(long_prompts))
    return {"runs": runs, "targets": targets, "long_prompts": long_prompts, "paired": pairs,
            "settings": {"trace": settings.trace.__dict__, "ttft_target_ms":
                         settings.ttft_target_s * 1000, "itl_target_ms":
                         settings.itl_target_s * 1000},
            "timelines": {n: _timeline(o) for n, o in observations.items()}}


def _paired_ceiling(loaded: LoadedModel, prompts: list[str], trace: list[Arrival],
                    settings: BenchSettings) -> PairedCeiling:
    return PairedCeiling(loaded, prompts, [a for a in trace if a.phase == "saturation"],
                         settings.trace.max_new_tokens, settings.ceiling_batch_sizes,
                         settings.paired_rounds, settings.drain_timeout_s)


def _announced(paired: PairedCeiling, progress: Progress) -> AfterTrace:
    async def measure(client: StreamprocClient) -> None:
        progress(f"offline ceiling: generate() alone at batch sizes "
                 f"{', '.join(map(str, paired.batch_sizes))}")
        await paired.sweep_sizes()
        progress(f"[streamproc] {paired.rounds} more saturation waves of "
                 f"{len(paired.wave)}, each between two runs of generate() at batch size "
                 f"{paired.batch_size}")
        await paired.measure(client)
    return measure


async def replay_peers(bootstrap: str, model_dir: str, trace: list[Arrival],
                       settings: BenchSettings, progress: Progress, *,
                       after_streamproc: AfterTrace | None = None
                       ) -> dict[str, list[Observation]]:
    """Each peer in turn, in a process of its own and on fresh topics, serving ``trace``:
    every request as the client saw it. ``after_streamproc`` runs once streamproc has
    served the trace, before it stops."""
    observations: dict[str, list[Observation]] = {}
    for name in PEERS:
        # What the bench process holds so far (the model, earlier runs' observations) leaves
        # the collector's reach: a full collection over it stalled this client's event loop
        # for up to a quarter of a second mid-run, which the peer being measured would wear.
        gc.collect()
        gc.freeze()
        names = await _fresh_topics(bootstrap)
        peer = _make_peer(name, bootstrap, names, model_dir, settings)
        after = after_streamproc if name == "streamproc" else None
        observations[name] = await _replay(name, peer, bootstrap, names, trace, settings,
                                           progress, after)
    return observations


async def _offline_runs(loaded: LoadedModel, prompts: list[str], settings: BenchSettings,
                        progress: Progress, sweep: dict[str, float]) -> dict[str, Any]:
    """The ceiling (``sweep``, if it was measured beside streamproc) and the engine alone,
    with no Kafka, in this process."""
    runs: dict[str, Any] = {}
    new_tokens, batch = settings.trace.max_new_tokens, settings.max_batch_size
    if not sweep:
        progress("offline ceiling: generate() alone at several batch sizes")
        sweep = await asyncio.to_thread(offline_ceiling, loaded, prompts, new_tokens,
                                        settings.ceiling_batch_sizes)
    runs["offline_ceiling"] = _ceiling_run(sweep)
    progress("offline engine: streamproc's engine alone, no Kafka")
    engine_rate = await asyncio.to_thread(offline_engine, loaded, prompts, new_tokens, batch)
    runs["offline_engine"] = _ceiling_run({str(batch): engine_rate})
    progress(f"offline engine sampling (temperature {SAMPLED[0]:g}, top-p {SAMPLED[1]:g})")
    sampled_rate = await asyncio.to_thread(offline_engine, loaded, prompts, new_tokens, batch,
                                           temperature=SAMPLED[0], top_p=SAMPLED[1])
    runs["offline_engine_sampled"] = _ceiling_run({str(batch): sampled_rate})
    threads = serving_threads(0, usable_cores())
    if loaded.device.type == "cpu" and threads != torch.get_num_threads():
        progress(f"offline engine on {threads} CPU thread(s), as a worker here serves")
        served_rate = await asyncio.to_thread(offline_engine, loaded, prompts, new_tokens,
                                              batch, threads)
        runs["offline_engine_worker_threads"] = _ceiling_run({str(batch): served_rate})
    return runs


async def _long_prompt_runs(loaded: LoadedModel, progress: Progress) -> dict[str, Any]:
    """The engine alone with long prompts joining: prefilled whole, in a worker's default
    chunks, and in small ones, taking turns."""
    sizes = (0, WorkerConfig().prefill_chunk_tokens, SMALL_CHUNK)
    progress(f"long prompts: {LONG_PROMPT} tokens joining {RUNNING} running, prefilled whole "
             f"and in chunks of {sizes[1]} and {sizes[2]}, {ROUNDS} rounds")
    return await asyncio.to_thread(compare_chunk_sizes, loaded, sizes)


def _long_prompt_ratios(runs: dict[str, Any]) -> dict[str, float]:
    """Each chunked run's longest step per long prompt (median) and tokens/s against the
    whole-prompt run's."""
    whole = runs["whole"]
    ratios = {}
    for label, run in runs.items():
        if label != "whole":
            ratios[f"long_prompt_spike_{label}_vs_whole"] = (
                run["long_prompt_step_p50_ms"] / max(whole["long_prompt_step_p50_ms"], 1e-9))
            ratios[f"long_prompt_rate_{label}_vs_whole"] = (
                run["tokens_per_s"] / max(whole["tokens_per_s"], 1e-9))
    return ratios


class PeerProcess:
    """A peer served by ``python -m streamproc.bench.serve`` in a child process."""

    def __init__(self, spec: PeerSpec) -> None:
        self._spec = spec
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamproc.bench.serve",
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
               settings: BenchSettings) -> Peer:
    return PeerProcess(PeerSpec(name, bootstrap, names, model_dir, settings.ttft_target_s,
                                settings.itl_target_s, settings.fixed_window_s,
                                settings.fixed_batch, settings.max_batch_size))


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
            observations = await replay(client, trace, settings.drain_timeout_s)
            finished = sum(o.finished is not None for o in observations)
            progress(f"[{name}] {finished}/{len(trace)} completed in "
                     f"{time.monotonic() - started:.1f}s")
            if after is not None:
                await after(client)
            return observations
    finally:
        await peer.stop()


def _summaries(observations: list[Observation], settings: BenchSettings) -> dict[str, Any]:
    def by(phases: Callable[[str], bool]) -> dict[str, Any]:
        return summarize([o for o in observations if phases(o.phase)], settings.ttft_target_s,
                         settings.itl_target_s)
    run = by(lambda p: True)
    run["steady"] = by(lambda p: p.startswith("steady"))
    run["burst"] = by(lambda p: p == "burst")
    run["saturation"] = by(lambda p: p == "saturation")
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


def _targets(runs: dict[str, Any], settings: BenchSettings,
             paired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The targets' ratios and whether each is met. ``paired``: the rounds of
    :mod:`streamproc.bench.paired`, whose median ratio the throughput target reads when
    there were any (else the trace's wave against the sweep's best)."""
    ours, fixed, naive = runs["streamproc"], runs["fixed_window"], runs["naive"]
    ceiling = runs["offline_ceiling"]["tokens_per_s"]
    itl_limit = settings.itl_target_s * 1.2 * 1000
    alone = {"engine_alone": "offline_engine",
             "engine_alone_worker_threads": "offline_engine_worker_threads"}
    trace_ratio = ours["saturated_tokens_per_s"] / ceiling if ceiling else 0.0
    paired_ratio = paired["median_ratio"] if paired and paired["rounds"] else None
    ratio = {
        "throughput_vs_ceiling": trace_ratio if paired_ratio is None else paired_ratio,
        "throughput_vs_ceiling_trace": trace_ratio,
        **{f"{key}_vs_ceiling": runs[run]["tokens_per_s"] / ceiling if ceiling else 0.0
           for key, run in alone.items() if run in runs},
        "throughput_vs_naive": (ours["saturated_tokens_per_s"]
                                / max(naive["saturated_tokens_per_s"], 1e-9)),
        "ttft_p99_vs_fixed_window": (ours["steady"]["ttft_p99_ms"]
                                     / max(fixed["steady"]["ttft_p99_ms"], 1e-9)),
        "burst_itl_p95_ms": ours["burst"]["itl_p95_ms"],
        "fixed_window_burst_itl_p95_ms": fixed["burst"]["itl_p95_ms"],
    }
    ratio.update(_ttft_by_phase(ours, fixed))
    if "offline_engine_sampled" in runs:  # what sampling costs the engine, against greedy
        ratio["engine_sampled_vs_greedy"] = (runs["offline_engine_sampled"]["tokens_per_s"]
                                             / max(runs["offline_engine"]["tokens_per_s"], 1e-9))
    met = {
        "throughput_vs_ceiling >= 0.85": ratio["throughput_vs_ceiling"] >= 0.85,
        "throughput_vs_naive >= 10": ratio["throughput_vs_naive"] >= 10,
        "ttft_p99_vs_fixed_window <= 1/3": ratio["ttft_p99_vs_fixed_window"] <= 1 / 3,
        "burst itl p95 within 1.2x target (and fixed window not)":
            ratio["burst_itl_p95_ms"] <= itl_limit < ratio["fixed_window_burst_itl_p95_ms"],
        "nothing lost": (all(r["lost"] == 0 for r in runs.values())
                         and (paired is None or paired["lost"] == 0)),
    }
    return {"ratios": ratio, "met": met}


def _ttft_by_phase(ours: dict[str, Any], fixed: dict[str, Any]) -> dict[str, float]:
    """TTFT p99 against the fixed window's, phase by phase (steady rates and the burst), and
    the steady median: the target pools the steady phases, where a few slow requests decide
    a p99, and these say at which load the gap holds and what a typical request sees."""
    ratios = {"ttft_p50_vs_fixed_window": (ours["steady"]["ttft_p50_ms"]
                                           / max(fixed["steady"]["ttft_p50_ms"], 1e-9))}
    for phase in sorted(ours["phases"], key=_trace_order):
        figures, theirs = ours["phases"][phase], fixed["phases"].get(phase)
        if phase != "saturation" and theirs is not None:
            ratios[f"ttft_p99_vs_fixed_window_{phase}"] = (
                figures["ttft_p99_ms"] / max(theirs["ttft_p99_ms"], 1e-9))
    return ratios


def _trace_order(phase: str) -> tuple[int, float]:
    """Steady phases by rate, then the rest (``steady_10`` sorts after ``steady_2``)."""
    kind, _, rate = phase.partition("_")
    return (0, float(rate)) if kind == "steady" else (1, 0.0)
