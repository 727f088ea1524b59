"""The benchmark's peers, each in a process of its own, serving a short trace through the
real broker: what `make bench` compares must be whole before it is compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamproc.bench.run import PEERS, BenchSettings, replay_peers
from streamproc.bench.trace import TraceSettings, build

pytestmark = [pytest.mark.kafka, pytest.mark.model]

SHORT = BenchSettings(
    trace=TraceSettings(rates=(4.0,), phase_s=1.0, burst_s=0.5, gap_s=0.2,
                        saturation_requests=12, max_new_tokens=4),
    max_batch_size=8, drain_timeout_s=60.0)


async def test_every_peer_streams_every_request_of_the_trace_whole(
        bootstrap: str, tiny_model_dir: Path) -> None:
    trace = build(SHORT.trace)
    said: list[str] = []
    seen = await replay_peers(bootstrap, str(tiny_model_dir), trace, SHORT, said.append)
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
