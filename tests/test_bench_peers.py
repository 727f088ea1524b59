"""The benchmark's peers, each in a process of its own, serving a short trace through the
real broker: what `make bench` compares must be whole before it is compared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamproc.devtools.bench.paired import wave_ratios
from streamproc.devtools.bench.run import (
    PAIRED_PEER,
    PEERS,
    _announced,
    _paired_ceiling,
    replay_peers,
)
from streamproc.devtools.bench.settings import BenchSettings
from streamproc.devtools.bench.trace import TraceSettings, build
from streamproc.engine.loader import LoadedModel
from streamproc.metrics.trace import as_columns, read_trace

pytestmark = [pytest.mark.kafka, pytest.mark.model]

SHORT = BenchSettings(
    trace=TraceSettings(rates=(4.0,), phase_s=1.0, burst_s=0.5, gap_s=0.2,
                        saturation_requests=12, max_new_tokens=4),
    max_batch_size=8, drain_timeout_s=60.0)


async def test_every_peer_streams_every_request_of_the_trace_whole(
        bootstrap: str, tiny_model_dir: Path, loaded_model: LoadedModel,
        tmp_path: Path) -> None:
    trace = build(SHORT.trace)
    said: list[str] = []
    # As run_bench wires it: after the trace, throughput mode serves paired rounds.
    paired = _paired_ceiling(loaded_model, [a.prompt for a in trace[:4]], trace, SHORT)
    seen = await replay_peers(bootstrap, str(tiny_model_dir), trace, SHORT, said.append,
                              after_paired_peer=_announced(paired, said.append),
                              trace_dir=tmp_path)
    assert list(seen) == list(PEERS)
    for name, observations in seen.items():
        assert [o.phase for o in observations] == [a.phase for a in trace], name
        # ignore_eos: every token asked for, counted from the chunks the client read
        assert [o.tokens for o in observations] == [a.max_new_tokens for a in trace], name
        for o in observations:
            assert o.first_token is not None, name
            assert o.finished is not None, name
            assert o.submitted <= o.first_token <= o.finished
        assert f"[{name}] {len(trace)}/{len(trace)} completed" in "\n".join(said)

    # Then three more waves, each between two ceiling runs at the sweep's best size.
    wave = [a for a in trace if a.phase == "saturation"]
    assert set(paired.sweep) == {"1", "8"}
    assert f"[{PAIRED_PEER}] 3 more saturation waves of 12" in "\n".join(said)
    assert "paired round 3/3" in said[-1]
    assert (len(paired.waves), len(paired.ceilings)) == (3, 4)
    for observations in paired.waves:
        assert [o.tokens for o in observations] == [a.max_new_tokens for a in wave]
    report = paired.report(SHORT.ttft_target_s, SHORT.itl_target_s)
    assert (report["requests"], report["completed"], report["lost"]) == (36, 36, 0)
    assert report["batch_size"] == 8
    assert all(rate > 0 for rate in report["ceiling_tokens_per_s"])
    assert report["ratios"] == wave_ratios(report["ceiling_tokens_per_s"],
                                           report["streamproc_tokens_per_s"])
    assert min(report["ratios"]) <= report["median_ratio"] <= max(report["ratios"])

    # Both streamproc peers wrote every step and decision; the baselines nothing.
    assert sorted(os.listdir(tmp_path)) == [
        "streamproc.jsonl", "streamproc_throughput.jsonl"]
    for name in ("streamproc", "streamproc_throughput"):
        steps = as_columns(read_trace(tmp_path / f"{name}.jsonl"))["steps"]
        served = len(trace) + (len(wave) * 3 if name == PAIRED_PEER else 0)
        assert sum(steps["admitted"]) == served, name
        # every request decoded max_new_tokens - 1 tokens after its first
        assert sum(steps["rows"]) >= served * (SHORT.trace.max_new_tokens - 1), name
        assert all(a <= b for a, b in zip(steps["at_s"], steps["at_s"][1:], strict=False))
