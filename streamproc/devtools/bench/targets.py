"""The benchmark's targets: ratios of runs measured side by side, and whether each is met.

Two streamproc peers serve the trace: ``streamproc`` under the inter-token target
(latency mode) and ``streamproc_throughput`` with none (throughput mode). The
throughput, batching-gain and first-token targets read throughput mode, the inter-token
and goodput targets read latency mode; each mode's figure for the other's target stands
beside it, so the trade-off between them is measured rather than hidden.
"""

from __future__ import annotations

from typing import Any

LATENCY, THROUGHPUT = "streamproc", "streamproc_throughput"
ITL_SLACK = 1.2
"""The inter-token target is met at p95 within this factor of the target."""
UNDER_PRESSURE = ("burst", "saturation")
"""The phases the inter-token target is judged in: where batches run full."""


def targets(runs: dict[str, Any], itl_target_ms: float,
            paired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ratios and the targets met. ``paired``: the rounds of
    :mod:`streamproc.devtools.bench.paired`, whose median ratio the throughput target reads when
    there were any (else the trace's wave against the sweep's best)."""
    ratio = {**_throughput(runs, paired), **_latency(runs, itl_target_ms)}
    ratio.update(_ttft_by_phase(runs[THROUGHPUT], runs["fixed_window"]))
    if "offline_engine_sampled" in runs:  # what sampling costs the engine, against greedy
        ratio["engine_sampled_vs_greedy"] = (runs["offline_engine_sampled"]["tokens_per_s"]
                                             / _nonzero(runs["offline_engine"]["tokens_per_s"]))
    limit = itl_target_ms * ITL_SLACK
    met = {
        "throughput_vs_ceiling >= 0.9": ratio["throughput_vs_ceiling"] >= 0.9,
        "batching_gain_vs_generate >= 0.9": ratio["batching_gain_vs_generate"] >= 0.9,
        "ttft_p99_vs_fixed_window <= 1/3": ratio["ttft_p99_vs_fixed_window"] <= 1 / 3,
        f"burst and wave itl p95 <= {limit:g} ms": all(
            ratio[f"{phase}_itl_p95_ms"] <= limit for phase in UNDER_PRESSURE),
        f"fixed window's burst and wave itl p95 over {itl_target_ms:g} ms": all(
            ratio[f"fixed_window_{phase}_itl_p95_ms"] > itl_target_ms
            for phase in UNDER_PRESSURE),
        "goodput_vs_fixed_window > 1": ratio["goodput_vs_fixed_window"] > 1,
        "nothing lost": (all(r["lost"] == 0 for r in runs.values())
                         and (paired is None or paired["lost"] == 0)),
    }
    return {"ratios": ratio, "met": met}


def _throughput(runs: dict[str, Any], paired: dict[str, Any] | None) -> dict[str, float]:
    ours, naive = runs[THROUGHPUT], runs["naive"]
    ceiling = runs["offline_ceiling"]
    best = ceiling["tokens_per_s"]
    trace_ratio = ours["saturated_tokens_per_s"] / best if best else 0.0
    paired_ratio = paired["median_ratio"] if paired and paired["rounds"] else None
    alone = {"engine_alone": "offline_engine",
             "engine_alone_worker_threads": "offline_engine_worker_threads"}
    gain = ours["saturated_tokens_per_s"] / _nonzero(naive["saturated_tokens_per_s"])
    one = ceiling.get("by_batch_size", {}).get("1")
    generate_gain = best / one if one else 0.0
    return {
        "throughput_vs_ceiling": trace_ratio if paired_ratio is None else paired_ratio,
        "throughput_vs_ceiling_trace": trace_ratio,
        **{f"{key}_vs_ceiling": runs[run]["tokens_per_s"] / best if best else 0.0
           for key, run in alone.items() if run in runs},
        "throughput_vs_naive": gain,
        "generate_batching_gain": generate_gain,
        # Against naive, the gain generate() itself shows from batching (best size / 1).
        "batching_gain_vs_generate": gain / generate_gain if generate_gain else 0.0,
        "latency_mode_throughput_vs_throughput_mode": (
            runs[LATENCY]["saturated_tokens_per_s"]
            / _nonzero(ours["saturated_tokens_per_s"])),
    }


def _latency(runs: dict[str, Any], itl_target_ms: float) -> dict[str, float]:
    ours, fixed, fast = runs[LATENCY], runs["fixed_window"], runs[THROUGHPUT]
    figures: dict[str, float] = {"itl_target_ms": itl_target_ms}
    for phase in UNDER_PRESSURE:
        figures[f"{phase}_itl_p95_ms"] = ours[phase]["itl_p95_ms"]
        figures[f"fixed_window_{phase}_itl_p95_ms"] = fixed[phase]["itl_p95_ms"]
        figures[f"throughput_mode_{phase}_itl_p95_ms"] = fast[phase]["itl_p95_ms"]
    figures["goodput_vs_fixed_window"] = (ours["goodput_tokens_per_s"]
                                          / _nonzero(fixed["goodput_tokens_per_s"]))
    figures["throughput_mode_goodput_vs_fixed_window"] = (
        fast["goodput_tokens_per_s"] / _nonzero(fixed["goodput_tokens_per_s"]))
    figures["ttft_p99_vs_fixed_window"] = (fast["steady"]["ttft_p99_ms"]
                                           / _nonzero(fixed["steady"]["ttft_p99_ms"]))
    figures["latency_mode_ttft_p99_vs_fixed_window"] = (
        ours["steady"]["ttft_p99_ms"] / _nonzero(fixed["steady"]["ttft_p99_ms"]))
    return figures


def _ttft_by_phase(ours: dict[str, Any], fixed: dict[str, Any]) -> dict[str, float]:
    """TTFT p99 against the fixed window's, phase by phase (steady rates and the burst), and
    the steady median: the target pools the steady phases, where a few slow requests decide
    a p99, and these say at which load the gap holds and what a typical request sees."""
    ratios = {"ttft_p50_vs_fixed_window": (ours["steady"]["ttft_p50_ms"]
                                           / _nonzero(fixed["steady"]["ttft_p50_ms"]))}
    for phase in sorted(ours["phases"], key=_trace_order):
        figures, theirs = ours["phases"][phase], fixed["phases"].get(phase)
        if phase != "saturation" and theirs is not None:
            ratios[f"ttft_p99_vs_fixed_window_{phase}"] = (
                figures["ttft_p99_ms"] / _nonzero(theirs["ttft_p99_ms"]))
    return ratios


def long_prompt_ratios(runs: dict[str, Any]) -> dict[str, float]:
    """Each chunked run's longest step per long prompt (median) and tokens/s against the
    whole-prompt run's."""
    whole = runs["whole"]
    ratios = {}
    for label, run in runs.items():
        if label != "whole":
            ratios[f"long_prompt_spike_{label}_vs_whole"] = (
                run["long_prompt_step_p50_ms"] / _nonzero(whole["long_prompt_step_p50_ms"]))
            ratios[f"long_prompt_rate_{label}_vs_whole"] = (
                run["tokens_per_s"] / _nonzero(whole["tokens_per_s"]))
    return ratios


def _trace_order(phase: str) -> tuple[int, float]:
    """Steady phases by rate, then the rest (``steady_10`` sorts after ``steady_2``)."""
    kind, _, rate = phase.partition("_")
    return (0, float(rate)) if kind == "steady" else (1, 0.0)


def _nonzero(value: float) -> float:
    return max(value, 1e-9)
