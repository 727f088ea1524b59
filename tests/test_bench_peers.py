"""The benchmark's peers, each in a process of its own, serving a short trace through the
real broker: what `make bench` compares must be whole before it is compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamproc.bench.paired import PairedCeiling, wave_ratios
from streamproc.bench.run import PEERS, BenchSettings, replay_peers
from streamproc.bench.trace import TraceSettings, build
from streamproc.client import StreamprocClient
from streamproc.engine.loader import LoadedModel

pytestmark = [pytest.mark.kafka, pytest.mark.model]

SHORT = BenchSettings(
    trace=TraceSettings(rates=(4.0,), phase_s=1.0, burst_s=0.5, gap_s=0.2,
                        saturation_requests=12, max_new_tokens=4),
    max_batch_size=8, drain_timeout_s=60.0)


async def test_every_peer_streams_every_request_of_the_trace_whole(
        bootstrap: str, tiny_model_dir: Path, loaded_model: LoadedModel) -> None:
    trace = build(SHORT.trace)
    said: list[str] = []
    wave = [a for a in trace if a.phase == "saturation"]
    paired = PairedCeiling(loaded_model, [a.prompt for a in trace[:4]], wave,
                           SHORT.trace.max_new_tokens, (2, 4), rounds=2,
                           drain_timeout_s=SHORT.drain_timeout_s)

    async def pair(client: StreamprocClient) -> None:
        await paired.sweep_sizes()
        await paired.measure(client)

    seen = await replay_peers(bootstrap, str(tiny_model_dir), trace, SHORT, said.append,
                              after_streamproc=pair)
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

    # After the trace, streamproc served two more waves, each between two ceiling runs.
    assert set(paired.sweep) == {"2", "4"}
    assert (len(paired.waves), len(paired.ceilings)) == (2, 3)
    for observations in paired.waves:
        assert [o.tokens for o in observations] == [a.max_new_tokens for a in wave]
    report = paired.report(SHORT.ttft_target_s, SHORT.itl_target_s)
    assert (report["requests"], report["completed"], report["lost"]) == (24, 24, 0)
    assert report["batch_size"] == paired.batch_size
    assert all(rate > 0 for rate in report["ceiling_tokens_per_s"])
    assert report["ratios"] == wave_ratios(report["ceiling_tokens_per_s"],
                                           report["streamproc_tokens_per_s"])
    assert min(report["ratios"]) <= report["median_ratio"] <= max(report["ratios"])
