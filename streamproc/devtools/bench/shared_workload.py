"""The shared-prefix workload of ``streamproc bench``: one instruction, many records.

The commonest job that reaches an LLM through a queue: the same system prompt and
few-shot examples (a few hundred tokens through the chat template) in front of every
record, short records, short answers, all published at once as a batch job is. Every
peer serves it through real Kafka in its own process, as the trace's peers do:
naive, the fixed window, and streamproc with its prefix cache on and off, so the
cache's gain is read side by side in one run.
"""

from __future__ import annotations

from typing import Any

from streamproc.devtools.bench.settings import SharedPrefixSettings
from streamproc.devtools.bench.shared_prefix import chat_texts
from streamproc.devtools.bench.trace import Arrival

PHASE = "shared_prefix"
CACHE_ON, CACHE_OFF = "streamproc", "streamproc_prefix_off"
PEERS = ("naive", "fixed_window", CACHE_ON, CACHE_OFF)
THROUGHPUT_TARGET = 2.5
"""Cache on / off, tokens per second."""
TTFT_TARGET = 0.4
"""Cache on / off, time to first token at p50."""


def shared_prefix_trace(tokenizer: Any, settings: SharedPrefixSettings) -> list[Arrival]:
    """Every record at once, each the instruction then the record through the chat template."""
    return [Arrival(0.0, text, settings.new_tokens, PHASE)
            for text in chat_texts(tokenizer, settings.records, shared=True)]


def shared_prefix_report(runs: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the peers' runs, and the cache's targets met or not."""
    on, off = runs[CACHE_ON], runs[CACHE_OFF]
    ratios = {
        "prefix_cache_throughput_vs_off": _ratio(on["tokens_per_s"], off["tokens_per_s"]),
        "prefix_cache_ttft_p50_vs_off": _ratio(on["ttft_p50_ms"], off["ttft_p50_ms"]),
        "prefix_cache_throughput_vs_naive": _ratio(on["tokens_per_s"],
                                                   runs["naive"]["tokens_per_s"]),
        "prefix_cache_throughput_vs_fixed_window": _ratio(
            on["tokens_per_s"], runs["fixed_window"]["tokens_per_s"]),
    }
    met = {
        f"shared prefix throughput vs cache off >= {THROUGHPUT_TARGET:g}":
            ratios["prefix_cache_throughput_vs_off"] >= THROUGHPUT_TARGET,
        f"shared prefix ttft p50 vs cache off <= {TTFT_TARGET:g}":
            ratios["prefix_cache_ttft_p50_vs_off"] <= TTFT_TARGET,
        "shared prefix: nothing lost": all(r["lost"] == 0 for r in runs.values()),
    }
    return {"runs": runs, "ratios": ratios, "met": met}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
