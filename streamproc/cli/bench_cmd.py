"""``streamproc bench``: naive, fixed-window and streamproc on one trace, plus the ceiling."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from streamproc.bench.run import BenchSettings, run_bench
from streamproc.bench.trace import TraceSettings
from streamproc.cli.common import add_bootstrap, run
from streamproc.cli.demo_cmd import local_broker, tiny_model
from streamproc.config import bootstrap_from_env
from streamproc.engine.loader import load_model
from streamproc.errors import ConfigError

_TRACE = TraceSettings()
_SETTINGS = BenchSettings()
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
                       "a fixed-window micro-batcher and streamproc, each in its own process, "
                       "then measure offline generate() as the ceiling and streamproc's engine "
                       "alone, both without Kafka. Writes a JSON report and a PNG chart.")
    add_bootstrap(p)
    p.add_argument("--model", help="model (default: the tiny local model)")
    p.add_argument("--json", type=Path, default=Path("bench-report.json"),
                   help="where the JSON report goes (%(default)s)")
    p.add_argument("--png", type=Path, default=Path("bench-report.png"),
                   help="where the chart goes (%(default)s)")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in _TRACE.rates),
                   help="steady phases, requests/s (%(default)s)")
    p.add_argument("--phase-seconds", type=float, default=_TRACE.phase_s,
                   help="length of each steady phase (%(default)g)")
    p.add_argument("--saturation", type=int, default=_TRACE.saturation_requests,
                   help="requests in the last wave, all at once (%(default)s): enough that "
                   "batches run full for a while, not just ramp up and down")
    p.add_argument("--paired-rounds", type=int, default=_SETTINGS.paired_rounds,
                   help="after the trace, saturation waves through streamproc taken in turns "
                   "with generate() at its best batch size; the throughput target reads "
                   "their median ratio (%(default)s; 0: the trace's wave against the sweep)")
    p.add_argument("--max-new-tokens", type=int, default=_TRACE.max_new_tokens,
                   help="tokens generated per request (%(default)s)")
    p.add_argument("--ttft-target-ms", type=float, default=_SETTINGS.ttft_target_s * 1000,
                   help="streamproc's time-to-first-token p95 target (%(default)g)")
    p.add_argument("--itl-target-ms", type=float, default=_SETTINGS.itl_target_s * 1000,
                   help="streamproc's inter-token p95 target (%(default)g)")
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    trace = TraceSettings(rates=tuple(float(r) for r in args.rates.split(",")),
                          phase_s=args.phase_seconds, saturation_requests=args.saturation,
                          max_new_tokens=args.max_new_tokens)
    if args.paired_rounds < 0:
        raise ConfigError(f"--paired-rounds must be >= 0, got {args.paired_rounds}")
    settings = BenchSettings(trace=trace, ttft_target_s=args.ttft_target_ms / 1000,
                             itl_target_s=args.itl_target_ms / 1000,
                             paired_rounds=args.paired_rounds)
    with ExitStack() as cleanup:
        address = args.bootstrap or bootstrap_from_env() or local_broker(cleanup)
        model = args.model or tiny_model()
        loaded = load_model(model, "auto")
        report = run(run_bench(address, loaded, model, settings, _say))
    report["device"] = str(loaded.device)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    from streamproc.bench.chart import draw
    draw(report, args.png)
    print(table(report))
    print(f"report: {args.json}  chart: {args.png}")
    return 0


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    head = f"{'':<{NAME_WIDTH}}" + "".join(f"{label:>11}" for _, label in COLUMNS)
    lines = [head]
    for name in ("naive", "fixed_window", "streamproc", "offline_ceiling", "offline_engine",
                 "offline_engine_sampled", "offline_engine_worker_threads"):
        if name not in runs:
            continue
        for suffix, figures in [("", runs[name]), (" (burst)", runs[name].get("burst"))]:
            if figures is None:
                continue
            cells = "".join(_cell(figures.get(key)) for key, _ in COLUMNS)
            lines.append(f"{name + suffix:<{NAME_WIDTH}}" + cells)
    lines += _long_prompt_lines(report.get("long_prompts", {}))
    lines += _paired_lines(report.get("paired"))
    lines.append("")
    for key, value in report["targets"]["ratios"].items():
        lines.append(f"{key:<40} {value:10.2f}")
    for key, ok in report["targets"]["met"].items():
        lines.append(f"{'MET ' if ok else 'MISSED'} {key}")
    return "\n".join(lines)


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



