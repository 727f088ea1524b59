"""``streamproc lag``: per group, lane and partition — lag, oldest age, drain time, status."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

from streamproc.cli.common import add_bootstrap, bootstrap, run, security
from streamproc.config import TopicNames
from streamproc.metrics.lag_monitor import LagMonitor, LagReport
from streamproc.topics import load_specs, topic_names

_CLEAR = "\x1b[H\x1b[2J"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lag", help="show consumer lag and group health",
                       description="A live table of lag per group, lane and partition: "
                       "log-end and committed offsets, the age of the oldest unprocessed "
                       "record, the estimated drain time, and the group's status (OK, WARN "
                       "when lag keeps growing, STALL when offsets stop moving while lag > 0, "
                       "STOP when no member is left to commit).")
    add_bootstrap(p)
    p.add_argument("--group", action="append", dest="groups", metavar="GROUP",
                   help="consumer group (repeatable; default: streamproc-workers)")
    p.add_argument("--topics-dir", type=Path, help="topic declarations (default: ./topics)")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between looks (%(default)g)")
    p.add_argument("--window", type=int, default=3,
                   help="looks over which health is judged (%(default)s); --once takes this many")
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    names = topic_names(load_specs(args.topics_dir))
    groups = args.groups or ["streamproc-workers"]
    return run(_watch(bootstrap(args), groups, names, args))


async def _watch(address: str, groups: list[str], names: TopicNames,
                 args: argparse.Namespace) -> int:
    monitors = [LagMonitor(address, g, names, window=args.window, security=security())
                for g in groups]
    started: list[LagMonitor] = []
    try:
        for monitor in monitors:
            await monitor.start()
            started.append(monitor)
        looks = args.window if args.once else None
        while True:
            reports = [await m.sample() for m in monitors]
            if looks is not None:
                looks -= 1
                if looks <= 0:
                    _show(reports, args.json, clear=False)
                    return 0
            else:
                _show(reports, args.json, clear=sys.stdout.isatty() and not args.json)
            await asyncio.sleep(args.interval)
    finally:
        for monitor in started:
            await monitor.stop()


def _show(reports: list[LagReport], as_json: bool, *, clear: bool) -> None:
    if as_json:
        print(json.dumps({"groups": [r.to_json() for r in reports]}), flush=True)
        return
    print((_CLEAR if clear else "") + "\n".join(render(r) for r in reports), flush=True)


def render(report: LagReport) -> str:
    head = (f"group {report.group_id}  status {report.status}  members {report.members}  "
            f"lag {report.lag}  drain {_seconds(report.drain_s)}  "
            f"{report.throughput.tokens_per_s:.0f} tok/s from {report.throughput.workers} "
            f"worker(s)")
    rows = [f"  {'lane':<36} {'part':>4} {'end':>9} {'committed':>9} {'lag':>7} "
            f"{'oldest':>8} {'drain':>8}"]
    for p in report.partitions:
        committed = "-" if p.committed is None else str(p.committed)
        rows.append(f"  {p.topic:<36} {p.partition:>4} {p.end_offset:>9} {committed:>9} "
                    f"{p.lag:>7} {_seconds(p.oldest_age_s):>8} {_seconds(p.drain_s):>8}")
    return "\n".join([head, *rows, ""])


def _seconds(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.1f}s"
