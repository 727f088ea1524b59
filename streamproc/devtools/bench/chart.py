"""The benchmark's PNG: latency against throughput, and latency through the burst."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"naive": "tab:gray", "fixed_window": "tab:orange", "streamproc": "tab:blue",
          "streamproc_throughput": "tab:green"}


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, color in COLORS.items():
        if name not in report["runs"]:
            continue
        phases = report["runs"][name]["phases"]
        steady = sorted((p for p in phases if p.startswith("steady")),
                        key=lambda p: float(p.split("_")[1]))
        left.plot([phases[p]["tokens_per_s"] for p in steady],
                  [phases[p]["ttft_p95_ms"] for p in steady], "o-", color=color, label=name)
        rows = report["timelines"][name]
        right.scatter([r[0] for r in rows], [r[2] for r in rows], s=6, color=color, label=name)
    ceiling = report["runs"]["offline_ceiling"]["tokens_per_s"]
    left.axvline(ceiling, color="black", linestyle="--", label="offline generate() ceiling")
    left.set(xlabel="achieved tokens/s (steady phases)", ylabel="TTFT p95 (ms)",
             xscale="log", yscale="log", title="Latency vs throughput")
    target = report["settings"]["itl_target_ms"]
    right.axhline(target * 1.2, color="red", linestyle="--", label="ITL target x1.2")
    right.set(xlabel="submit time (s)", ylabel="per-request ITL p95 (ms)", yscale="log",
              title="Inter-token latency over time (burst included)")
    for axes in (left, right):
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
