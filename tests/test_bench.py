"""The benchmark's pure parts: the trace, the figures, the table and the chart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from streamproc.cli.bench_cmd import table
from streamproc.devtools.bench.chart import draw
from streamproc.devtools.bench.long_prompts import compare_chunk_sizes
from streamproc.devtools.bench.measure import Observation, summarize
from streamproc.devtools.bench.paired import best_batch_size, wave_ratios
from streamproc.devtools.bench.peers import offline_ceiling, offline_engine
from streamproc.devtools.bench.run import _timeline
from streamproc.devtools.bench.settings import SharedPrefixSettings
from streamproc.devtools.bench.shared_prefix import INSTRUCTION
from streamproc.devtools.bench.shared_workload import shared_prefix_report, shared_prefix_trace
from streamproc.devtools.bench.targets import long_prompt_ratios, targets
from streamproc.devtools.bench.trace import TraceSettings, build
from streamproc.engine.loader import LoadedModel
from streamproc.metrics.stats import percentile

SMALL = TraceSettings(rates=(2.0, 8.0), phase_s=5.0, burst_s=1.0, saturation_requests=20)


def test_the_trace_is_seeded_and_shaped_as_declared() -> None:
    trace = build(SMALL)
    assert trace == build(SMALL)
    assert build(SMALL) != build(TraceSettings(**{**SMALL.__dict__, "seed": 8}))
    phases = [a.phase for a in trace]
    assert phases.count("saturation") == 20
    assert [a.at_s for a in trace] == sorted(a.at_s for a in trace)
    steady = phases.count("steady_2") / 5.0, phases.count("steady_8") / 5.0
    assert steady[0] < steady[1]  # Poisson counts follow the rates
    burst = [a for a in trace if a.phase == "burst"]
    assert len(burst) > phases.count("steady_8") / 5.0  # 10 x the middle rate for 1 s
    assert all(a.max_new_tokens == SMALL.max_new_tokens for a in trace)


def test_summaries_count_losses_and_latencies() -> None:
    done = Observation("steady", submitted=0.0, first_token=0.1, finished=0.5, tokens=5,
                       gaps=[0.1] * 4)
    lost = Observation("steady", submitted=0.2)
    figures = summarize([done, lost], ttft_target_s=0.2, itl_target_s=0.2)
    assert (figures["requests"], figures["completed"], figures["lost"]) == (2, 1, 1)
    assert figures["ttft_p50_ms"] == pytest.approx(100.0)
    assert figures["itl_p95_ms"] == pytest.approx(100.0)
    assert figures["tokens_per_s"] == pytest.approx(10.0)
    assert figures["within_targets"] == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 75) == 3.0  # nearest rank: ceil(0.75 * 4)
    assert percentile([5.0, 1.0, 3.0], 100) == 5.0
    assert percentile([], 95) == 0.0


def test_the_timeline_gives_each_answered_request_its_ttft_and_inter_token_p95() -> None:
    answered = Observation("steady", submitted=1.0, first_token=1.05, finished=2.0, tokens=21,
                           gaps=[0.01] * 19 + [0.2])
    late = Observation("burst", submitted=3.0, first_token=3.5, finished=4.0, tokens=1)
    lost = Observation("burst", submitted=0.5)
    rows = _timeline([answered, late, lost])
    assert rows == [[pytest.approx(0.5), pytest.approx(50.0), pytest.approx(10.0)],
                    [pytest.approx(2.5), pytest.approx(500.0), 0.0]]


def fake_run(tokens_per_s: float) -> dict[str, Any]:
    phase = {"tokens_per_s": tokens_per_s, "ttft_p50_ms": 20.0, "ttft_p95_ms": 50.0,
             "ttft_p99_ms": 60.0, "itl_p95_ms": 5.0, "lost": 0}
    return {**phase, "saturated_tokens_per_s": tokens_per_s, "completed": 3,
            "goodput_tokens_per_s": tokens_per_s / 2,
            "burst": dict(phase), "steady": dict(phase), "saturation": dict(phase),
            "phases": {"burst": dict(phase), "saturation": dict(phase),
                       "steady_8": dict(phase), "steady_2": dict(phase)}}


def fake_runs() -> dict[str, Any]:
    """Every target met at a 100 ms inter-token target: the fixed window's burst and wave
    over it, its steady TTFT p99 four times throughput mode's."""
    fixed = fake_run(50.0)
    fixed["steady"]["ttft_p99_ms"] = 240.0
    fixed["burst"]["itl_p95_ms"] = fixed["saturation"]["itl_p95_ms"] = 130.0
    return {"naive": fake_run(8.0), "fixed_window": fixed, "streamproc": fake_run(80.0),
            "streamproc_throughput": fake_run(90.0),
            "offline_ceiling": {"tokens_per_s": 100.0, "lost": 0,
                                "by_batch_size": {"1": 9.0, "8": 100.0}},
            "offline_engine": {"tokens_per_s": 120.0, "lost": 0},
            "offline_engine_sampled": {"tokens_per_s": 108.0, "lost": 0},
            "offline_engine_worker_threads": {"tokens_per_s": 110.0, "lost": 0}}


def test_targets_are_ratios_of_runs_measured_side_by_side() -> None:
    runs = fake_runs()
    found = targets(runs, 100.0)
    ratios = found["ratios"]
    assert ratios["throughput_vs_ceiling"] == pytest.approx(0.9)
    assert ratios["throughput_vs_ceiling_trace"] == pytest.approx(0.9)
    assert ratios["engine_alone_worker_threads_vs_ceiling"] == pytest.approx(1.1)
    assert ratios["engine_sampled_vs_greedy"] == pytest.approx(0.9)
    assert ratios["throughput_vs_naive"] == pytest.approx(11.25)
    # generate() gains 100/9 from batching; throughput mode over naive, 11.25 of it
    assert ratios["generate_batching_gain"] == pytest.approx(100 / 9)
    assert ratios["batching_gain_vs_generate"] == pytest.approx(11.25 * 9 / 100)
    assert ratios["ttft_p99_vs_fixed_window"] == pytest.approx(0.25)
    assert ratios["goodput_vs_fixed_window"] == pytest.approx(80 / 50)
    assert ratios["latency_mode_throughput_vs_throughput_mode"] == pytest.approx(80 / 90)
    assert all(found["met"].values()), found["met"]


def test_each_target_fails_on_its_own_figure() -> None:
    def missed(change: Callable[[dict[str, Any]], None]) -> list[str]:
        runs = fake_runs()
        change(runs)
        return [name for name, ok in targets(runs, 100.0)["met"].items() if not ok]
    assert missed(lambda r: r["streamproc_throughput"].update(saturated_tokens_per_s=70.0)
                  ) == ["throughput_vs_ceiling >= 0.9", "batching_gain_vs_generate >= 0.9"]
    assert missed(lambda r: r["offline_ceiling"]["by_batch_size"].update({"1": 7.0})
                  ) == ["batching_gain_vs_generate >= 0.9"]
    assert missed(lambda r: r["streamproc_throughput"]["steady"].update(ttft_p99_ms=90.0)
                  ) == ["ttft_p99_vs_fixed_window <= 1/3"]
    # the latency target is read on latency mode, not on throughput mode
    assert missed(lambda r: r["streamproc_throughput"]["burst"].update(itl_p95_ms=500.0)
                  ) == []
    assert missed(lambda r: r["streamproc"]["saturation"].update(itl_p95_ms=121.0)
                  ) == ["burst and wave itl p95 <= 120 ms"]
    assert missed(lambda r: r["fixed_window"]["saturation"].update(itl_p95_ms=100.0)
                  ) == ["fixed window's burst and wave itl p95 over 100 ms"]
    assert missed(lambda r: r["streamproc"].update(goodput_tokens_per_s=25.0)
                  ) == ["goodput_vs_fixed_window > 1"]
    assert missed(lambda r: r["naive"].update(lost=1)) == ["nothing lost"]


def test_first_token_ratios_come_phase_by_phase() -> None:
    runs = fake_runs()
    fixed = runs["fixed_window"]
    fixed["steady"]["ttft_p50_ms"] = 80.0
    fixed["phases"]["steady_8"]["ttft_p99_ms"] = 120.0
    by_phase = targets(runs, 100.0)["ratios"]
    assert by_phase["ttft_p50_vs_fixed_window"] == pytest.approx(0.25)
    assert by_phase["ttft_p99_vs_fixed_window_steady_8"] == pytest.approx(0.5)
    assert by_phase["ttft_p99_vs_fixed_window_steady_2"] == pytest.approx(1.0)
    assert by_phase["ttft_p99_vs_fixed_window_burst"] == pytest.approx(1.0)
    assert "ttft_p99_vs_fixed_window_saturation" not in by_phase
    assert [k for k in by_phase if k.startswith("ttft_p99_vs_fixed_window_")] == [
        f"ttft_p99_vs_fixed_window_{p}" for p in ("steady_2", "steady_8", "burst")]
    del runs["offline_engine_worker_threads"], runs["offline_engine_sampled"]
    ratios = targets(runs, 100.0)["ratios"]
    assert "engine_alone_worker_threads_vs_ceiling" not in ratios
    assert "engine_sampled_vs_greedy" not in ratios


def long_prompt_figures(spike_ms: float) -> dict[str, float]:
    return {"chunk_tokens": 0, "tokens_per_s": 100.0, "step_p50_ms": 2.0,
            "long_prompt_step_p50_ms": spike_ms, "long_prompt_step_max_ms": spike_ms * 2}


def test_long_prompt_ratios_compare_each_chunk_size_with_whole_prompts() -> None:
    runs = {"whole": long_prompt_figures(8.0), "chunks_512": long_prompt_figures(4.0),
            "chunks_128": long_prompt_figures(2.0)}
    runs["chunks_128"]["tokens_per_s"] = 90.0
    ratios = long_prompt_ratios(runs)
    assert ratios == {"long_prompt_spike_chunks_512_vs_whole": pytest.approx(0.5),
                      "long_prompt_rate_chunks_512_vs_whole": pytest.approx(1.0),
                      "long_prompt_spike_chunks_128_vs_whole": pytest.approx(0.25),
                      "long_prompt_rate_chunks_128_vs_whole": pytest.approx(0.9)}


@pytest.mark.model
def test_long_prompt_runs_measure_the_steps_of_each_long_prompt(
        loaded_model: LoadedModel) -> None:
    runs = compare_chunk_sizes(loaded_model, (0, 64), rounds=2, warm_steps=5,
                               measured_steps=60)
    assert set(runs) == {"whole", "chunks_64"}
    for run in runs.values():
        assert run["tokens_per_s"] > 0
        # Long prompts arrive at steps 0, 25 and 50: those whose first token came count.
        assert 0 < run["long_prompt_step_p50_ms"] <= run["long_prompt_step_max_ms"]
    assert runs["chunks_64"]["chunk_tokens"] == 64


def test_table_and_chart_render_a_report(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "model": {"name": "smollm2-135m-instruct", "parameters": 134_515_008,
                  "dtype": "torch.float32", "device": "cpu"},
        "runs": {"naive": fake_run(10.0), "fixed_window": fake_run(50.0),
                 "streamproc": fake_run(80.0), "streamproc_throughput": fake_run(90.0),
                 "offline_ceiling": {"tokens_per_s": 100.0, "lost": 0}},
        "targets": {"ratios": {"throughput_vs_ceiling": 0.8}, "met": {"nothing lost": True}},
        "settings": {"itl_target_ms": 100.0},
        "timelines": {"naive": [[0.0, 10.0, 2.0]], "fixed_window": [[0.1, 5.0, 1.0]],
                      "streamproc": [[0.2, 3.0, 1.5]],
                      "streamproc_throughput": [[0.2, 2.0, 2.5]]},
    }
    report["long_prompts"] = {"whole": long_prompt_figures(6.0),
                              "chunks_128": long_prompt_figures(3.0)}
    report["paired"] = {"rounds": 2, "batch_size": 64, "median_ratio": 0.875,
                        "ceiling_tokens_per_s": [100.0, 90.0, 110.0],
                        "streamproc_tokens_per_s": [95.0, 70.0], "ratios": [1.0, 0.7]}
    text = table(report)
    assert text.splitlines()[0] == ("model smollm2-135m-instruct: 134.5M parameters, "
                                    "float32 on cpu")
    assert "streamproc_throughput (burst)" in text
    assert "paired with generate() at batch size 64 (median ratio 0.88)" in text
    assert "wave / ceiling around it" in text
    assert "chunks_128" in text
    assert "MET  nothing lost" in text
    json.dumps(report)
    chart = tmp_path / "chart.png"
    draw(report, chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
def test_offline_rates_come_from_real_generation(loaded_model: LoadedModel) -> None:
    prompts = ["kafka stream", "token batch latency queue worker"]
    rates = offline_ceiling(loaded_model, prompts, 4, batch_sizes=(1, 2))
    assert set(rates) == {"1", "2"}
    assert all(rate > 0 for rate in rates.values())
    assert offline_engine(loaded_model, prompts, 4, batch_size=2) > 0
    assert offline_engine(loaded_model, prompts, 4, batch_size=2, temperature=0.8,
                          top_p=0.95) > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert offline_engine(loaded_model, prompts, 4, batch_size=2, threads=1) > 0
        assert torch.get_num_threads() == 2  # one thread for that run only
    finally:
        torch.set_num_threads(threads)


def paired_report(median_ratio: float, rounds: int = 3, lost: int = 0) -> dict[str, Any]:
    return {"rounds": rounds, "median_ratio": median_ratio, "lost": lost}


def test_the_throughput_target_reads_the_paired_rounds_when_there_were_any() -> None:
    runs = fake_runs()
    met = "throughput_vs_ceiling >= 0.9"
    paired = targets(runs, 100.0, paired_report(0.8))
    assert paired["ratios"]["throughput_vs_ceiling"] == pytest.approx(0.8)
    assert paired["ratios"]["throughput_vs_ceiling_trace"] == pytest.approx(0.9)
    assert not paired["met"][met]
    assert paired["met"]["nothing lost"]
    none_run = targets(runs, 100.0, paired_report(0.0, rounds=0))
    assert none_run["ratios"]["throughput_vs_ceiling"] == pytest.approx(0.9)
    assert none_run["met"][met]
    assert not targets(runs, 100.0, paired_report(0.9, lost=1))["met"]["nothing lost"]


def test_each_wave_is_set_against_the_ceiling_runs_either_side_of_it() -> None:
    assert wave_ratios([100.0, 80.0, 120.0], [45.0, 90.0]) == [
        pytest.approx(0.5), pytest.approx(0.9)]
    assert wave_ratios([100.0], []) == []
    with pytest.raises(ValueError, match="2 waves need 3 ceiling runs"):
        wave_ratios([100.0, 80.0], [45.0, 90.0])
    assert best_batch_size({"8": 10.0, "64": 30.0, "128": 20.0}) == 64


def _shared_run(tokens_per_s: float, ttft_p50_ms: float, lost: int = 0) -> dict[str, Any]:
    return {"tokens_per_s": tokens_per_s, "ttft_p50_ms": ttft_p50_ms, "lost": lost}


def test_the_shared_prefix_targets_read_the_cache_against_itself_off() -> None:
    runs = {"naive": _shared_run(5, 9000), "fixed_window": _shared_run(8, 8000),
            "streamproc": _shared_run(30, 2000), "streamproc_prefix_off": _shared_run(10, 6000)}
    report = shared_prefix_report(runs)
    assert report["ratios"]["prefix_cache_throughput_vs_off"] == 3.0
    assert report["ratios"]["prefix_cache_ttft_p50_vs_off"] == pytest.approx(1 / 3)
    assert report["ratios"]["prefix_cache_throughput_vs_naive"] == 6.0
    assert all(report["met"].values())
    runs["streamproc"] = _shared_run(20, 3000, lost=1)
    missed = shared_prefix_report(runs)["met"]
    assert not any(missed.values())  # 2.0x, 0.5x, one lost
    text = table({"model": {"name": "m", "parameters": 1e6, "dtype": "float32",
                            "device": "cpu"}, "shared_prefix": shared_prefix_report(runs)})
    assert "streamproc_prefix_off" in text
    assert "MISSED shared prefix throughput vs cache off >= 2.5" in text


def test_the_shared_prefix_records_share_the_instruction_and_nothing_after_it(
        loaded_model: LoadedModel) -> None:
    trace = shared_prefix_trace(loaded_model.tokenizer, SharedPrefixSettings(records=4))
    assert len({a.prompt for a in trace}) == 4
    assert all(a.at_s == 0 for a in trace)
    for arrival in trace:  # the instruction, then the record: the instruction is shared
        before_record = arrival.prompt.split("Ticket ")[0]
        assert INSTRUCTION in before_record
        assert before_record == trace[0].prompt.split("Ticket ")[0]
