"""``streamproc bench``: naive, fixed-window and streamproc on one trace, plus the ceiling."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamproc.cli.common import add_bootstrap, run
from streamproc.cli.demo_cmd import local_broker
from streamproc.config import DEFAULT_MODEL, bootstrap_from_env
from streamproc.devtools.bench.settings import (
    BenchSettings,
    SharedPrefixSettings,
    real_model_settings,
)
from streamproc.devtools.bench.trace import TraceSettings
from streamproc.engine import catalog
from streamproc.engine.catalog import TINY
from streamproc.errors import ConfigError

if TYPE_CHECKING:
    from streamproc.engine.loader import LoadedModel

TRACE, SHARED_PREFIX = "trace", "shared-prefix"
WORKLOADS = (TRACE, SHARED_PREFIX)
_TINY = BenchSettings()
_REAL = real_model_settings()
NAME_WIDTH = 30
"""Wide enough for every run name, with " (burst)" after the peers'."""
COLUMNS = [("tokens_per_s", "tok/s"), ("saturated_tokens_per_s", "sat tok/s"),
           ("ttft_p50_ms", "ttft p50"), ("ttft_p99_ms", "ttft p99"), ("itl_p50_ms", "itl p50"),
           ("itl_p95_ms", "itl p95"), ("itl_p99_ms", "itl p99"), ("e2e_p99_ms", "e2e p99"),
           ("completed", "done"), ("lost", "lost")]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmark against naive and fixed-window peers",
                       description="Replay one arrival trace (steady Poisson phases, a 10x "
                       "burst, a saturation wave) through real Kafka against a naive worker, "
                       "a fixed-window micro-batcher and streamproc in latency and in "
                       "throughput mode, each in its own process, then measure offline "
                       "generate() as the ceiling and streamproc's engine alone, both without "
                       "Kafka. Writes a JSON report and a PNG chart. Options left out take "
                       "the model's profile: sized for SmolLM2 on a 2-core CPU (under 10 "
                       "minutes), or, with --model tiny, for the 2-layer random model.")
    add_bootstrap(p)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="catalog name, .gguf file, directory or hub id (%(default)s; tiny: "
                   "the 2-layer random model, whose steps measure transport and batching "
                   "overhead, with a trace of thousands of requests sized for it)")
    p.add_argument("--json", type=Path, default=Path("bench-report.json"),
                   help="where the JSON report goes (%(default)s)")
    p.add_argument("--png", type=Path, default=Path("bench-report.png"),
                   help="where the chart goes (%(default)s)")
    p.add_argument("--rates", help=f"steady phases, requests/s (real model: "
                   f"{_rates(_REAL.trace)}; tiny: {_rates(_TINY.trace)})")
    p.add_argument("--phase-seconds", type=float, help=f"length of each steady phase "
                   f"({_REAL.trace.phase_s:g})")
    p.add_argument("--saturation", type=int,
                   help=f"requests in the last wave, all at once (real model: "
                   f"{_REAL.trace.saturation_requests}; tiny: "
                   f"{_TINY.trace.saturation_requests}): enough that batches run full for a "
                   "while, not just ramp up and down")
    p.add_argument("--paired-rounds", type=int,
                   help="after the trace, saturation waves through streamproc in throughput "
                   "mode taken in turns with generate() at its best batch size; the "
                   f"throughput target reads their median ratio (real model: "
                   f"{_REAL.paired_rounds}; tiny: {_TINY.paired_rounds}; 0: the trace's wave "
                   "against the sweep)")
    p.add_argument("--max-new-tokens", type=int, help=f"tokens generated per request (real "
                   f"model: {_REAL.trace.max_new_tokens}; tiny: {_TINY.trace.max_new_tokens})")
    p.add_argument("--ttft-target-ms", type=float, help=f"streamproc's time-to-first-token "
                   f"p95 target (real model: {_REAL.ttft_target_s * 1000:g}; tiny: "
                   f"{_TINY.ttft_target_s * 1000:g})")
    p.add_argument("--itl-target-ms", type=float, help=f"latency mode's inter-token p95 "
                   f"target (real model: {_REAL.itl_target_s * 1000:g}; tiny: "
                   f"{_TINY.itl_target_s * 1000:g})")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch's CPU threads in every peer alike (%(default)s: the worker's "
                   "own policy)")
    p.add_argument("--workloads",
                   help="which to run, comma-separated: trace (the arrival trace against "
                   "every peer, the offline ceiling and the targets), shared-prefix (one "
                   "instruction in front of many records, streamproc with its prefix cache "
                   "on and off beside naive and the fixed window) (real model: "
                   f"{','.join(WORKLOADS)}; tiny: {TRACE})")
    p.add_argument("--shared-records", type=int, help=f"records in the shared-prefix "
                   f"workload ({SharedPrefixSettings().records})")
    p.add_argument("--extras", action=argparse.BooleanOptionalAction, default=None,
                   help="also the engine alone sampled and on the worker's threads, and "
                   "900-token prompts joining a running batch (default with tiny only: on "
                   "a real model on a small CPU they take longer than the rest together)")
    p.set_defaults(handler=_main)


def _rates(trace: TraceSettings) -> str:
    return ",".join(f"{r:g}" for r in trace.rates)


def settings_from(args: argparse.Namespace, tiny: bool) -> BenchSettings:
    """The model's profile, with what the command line gives in its place."""
    base = _TINY if tiny else _REAL
    default = TRACE if tiny else ",".join(WORKLOADS)
    workloads = {w.strip() for w in (args.workloads or default).split(",") if w.strip()}
    if not workloads or workloads - set(WORKLOADS):
        raise ConfigError(f"--workloads takes a comma-separated choice of "
                          f"{', '.join(WORKLOADS)}, got {args.workloads!r}")
    shared = SharedPrefixSettings(records=0)
    if SHARED_PREFIX in workloads:
        shared = SharedPrefixSettings()
    if args.shared_records is not None and shared.records:
        if args.shared_records < 1:
            raise ConfigError(f"--shared-records must be >= 1, got {args.shared_records}")
        shared = replace(shared, records=args.shared_records)
    trace = replace(base.trace, **_given(
        rates=args.rates and tuple(float(r) for r in args.rates.split(",")),
        phase_s=args.phase_seconds, saturation_requests=args.saturation,
        max_new_tokens=args.max_new_tokens))
    if args.paired_rounds is not None and args.paired_rounds < 0:
        raise ConfigError(f"--paired-rounds must be >= 0, got {args.paired_rounds}")
    return replace(base, trace=trace, **_given(
        ttft_target_s=args.ttft_target_ms and args.ttft_target_ms / 1000,
        itl_target_s=args.itl_target_ms and args.itl_target_ms / 1000,
        paired_rounds=args.paired_rounds, extras=args.extras, cpu_threads=args.cpu_threads),
        shared_prefix=shared, run_trace=TRACE in workloads)


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _main(args: argparse.Namespace) -> int:
    # torch and transformers load here, not with the command line.
    from streamproc.engine.loader import load_model

    settings = settings_from(args, args.model == TINY)
    with ExitStack() as cleanup:
        address = args.bootstrap or bootstrap_from_env() or local_broker(cleanup, _say)
        model = catalog.resolve(args.model, progress=_say)
        loaded = load_model(model, "auto")
        report = run(_bench(address, loaded, model, settings))
    report["model"]["name"] = args.model
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    wrote = f"report: {args.json}"
    if "runs" in report:
        from streamproc.devtools.bench.chart import draw
        draw(report, args.png)
        wrote += f"  chart: {args.png}"
    print(table(report))
    print(wrote)
    return 0


async def _bench(address: str, loaded: LoadedModel, model: str,
                 settings: BenchSettings) -> dict[str, Any]:
    from streamproc.devtools.bench.run import describe, run_bench, run_shared_prefix

    report = (await run_bench(address, loaded, model, settings, _say) if settings.run_trace
              else {"model": describe(loaded, model)})
    if settings.shared_prefix.records:
        report["shared_prefix"] = await run_shared_prefix(address, loaded, model, settings,
                                                          _say)
    return report


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def table(report: dict[str, Any]) -> str:
    lines = [_model_line(report["model"])] if "model" in report else []
    if "runs" in report:
        lines += _trace_lines(report)
    if "shared_prefix" in report:
        lines += _shared_prefix_lines(report["shared_prefix"])
    return "\n".join(lines)


def _head() -> str:
    return f"{'':<{NAME_WIDTH}}" + "".join(f"{label:>11}" for _, label in COLUMNS)


def _row(name: str, figures: dict[str, Any]) -> str:
    return f"{name:<{NAME_WIDTH}}" + "".join(_cell(figures.get(key)) for key, _ in COLUMNS)


def _trace_lines(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    lines = []
    if "cpu_threads" in report.get("settings", {}):
        lines.append(_threads_line(report["settings"]["cpu_threads"]))
    lines.append(_head())
    for name in ("naive", "fixed_window", "streamproc", "streamproc_throughput",
                 "offline_ceiling", "offline_engine", "offline_engine_sampled",
                 "offline_engine_worker_threads"):
        if name not in runs:
            continue
        for suffix, figures in [("", runs[name]), (" (burst)", runs[name].get("burst"))]:
            if figures is not None:
                lines.append(_row(name + suffix, figures))
    lines += _long_prompt_lines(report.get("long_prompts", {}))
    lines += _paired_lines(report.get("paired"))
    return [*lines, "", *_verdict_lines(report["targets"])]


def _shared_prefix_lines(shared: dict[str, Any]) -> list[str]:
    lines = ["", "shared prefix: one instruction in front of every record", _head()]
    lines += [_row(name, figures) for name, figures in shared["runs"].items()]
    return [*lines, "", *_verdict_lines(shared)]


def _verdict_lines(targets: dict[str, Any]) -> list[str]:
    lines = [f"{key:<44} {value:10.2f}" for key, value in targets["ratios"].items()]
    return lines + [f"{'MET ' if ok else 'MISSED'} {key}" for key, ok in targets["met"].items()]


def _model_line(model: dict[str, Any]) -> str:
    return (f"model {model['name']}: {model['parameters'] / 1e6:.1f}M parameters, "
            f"{model['dtype'].removeprefix('torch.')} on {model['device']}")


def _threads_line(threads: dict[str, int]) -> str:
    return "torch CPU threads: " + ", ".join(f"{name} {n}" for name, n in threads.items())


def _long_prompt_lines(runs: dict[str, Any]) -> list[str]:
    if not runs:
        return []
    # The longest step while a long prompt prefilled: the running sequences' gap then.
    lines = ["", f"{'long prompts':<{NAME_WIDTH}}{'tokens/s':>11}{'step p50':>11}"
                 f"{'spike p50':>11}{'spike max':>11}"]
    for label, figures in runs.items():
        cells = "".join(_cell(figures[key]) for key in (
            "tokens_per_s", "step_p50_ms", "long_prompt_step_p50_ms", "long_prompt_step_max_ms"))
        lines.append(f"{label:<{NAME_WIDTH}}{cells}")
    return lines


def _paired_lines(paired: dict[str, Any] | None) -> list[str]:
    """The saturation waves taken in turns with the ceiling, and each one's ratio."""
    if not paired or not paired["rounds"]:
        return []
    def cells(values: list[float], digits: int) -> str:
        return "".join(f"{v:>11.{digits}f}" for v in values)
    return ["", f"paired with generate() at batch size {paired['batch_size']} "
                f"(median ratio {paired['median_ratio']:.2f})",
            f"{'ceiling runs, tokens/s':<{NAME_WIDTH}}"
            + cells(paired["ceiling_tokens_per_s"], 1),
            f"{'streamproc waves, tokens/s':<{NAME_WIDTH}}"
            + cells(paired["streamproc_tokens_per_s"], 1),
            f"{'wave / ceiling around it':<{NAME_WIDTH}}" + cells(paired["ratios"], 2)]


def _cell(value: Any) -> str:
    if value is None:
        return f"{'-':>11}"
    return f"{value:>11.1f}" if isinstance(value, float) else f"{value:>11}"



