"""Showing streams as they arrive, and the latency summary after them."""

from __future__ import annotations

import statistics
import sys

from streamproc.client import Result, ResultStream
from streamproc.metrics.percentiles import percentile

_WIDTH = 72


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "·" for c in text)


class LiveView:
    """On a terminal: one line per request, redrawn as chunks arrive.
    Elsewhere (CI, a pipe): a line at each request's first token and at its end."""

    def __init__(self, prompts: list[str], *, tty: bool) -> None:
        self._prompts = prompts
        self._texts = ["" for _ in prompts]
        self._status = ["waiting" for _ in prompts]
        self._tty = tty
        self._drawn = False

    async def follow(self, index: int, stream: ResultStream) -> Result:
        async for chunk in stream:
            if self._status[index] == "waiting" and not self._tty:
                print(f"  [{index}] first token: {_printable(chunk.text)!r}", flush=True)
            self._texts[index] += chunk.text
            self._status[index] = "streaming"
            self._redraw()
        result = await stream.result()
        self._status[index] = f"{result.finish_reason}, {result.usage.completion_tokens} tok"
        self._redraw()
        if not self._tty:
            print(f"  [{index}] done ({self._status[index]}): "
                  f"{_printable(self._prompts[index])} ⟶ {_printable(result.text)}", flush=True)
        return result

    def close(self, elapsed_s: float) -> None:
        self._redraw()
        print(f"all streams finished in {elapsed_s:.2f}s", flush=True)

    def _redraw(self) -> None:
        if not self._tty:
            return
        out = sys.stdout
        if self._drawn:
            out.write(f"\x1b[{len(self._prompts)}F")
        for i, prompt in enumerate(self._prompts):
            body = _printable(f"{prompt} ⟶ {self._texts[i]}")[-_WIDTH:]
            out.write(f"\x1b[2K[{i}] {self._status[i]:<16} {body}\n")
        out.flush()
        self._drawn = True


def summarize(results: list[Result]) -> str:
    """Requests, throughput, and TTFT / end-to-end percentiles (client clock)."""
    tokens = sum(r.usage.completion_tokens for r in results)
    span = max((r.client_total_s for r in results), default=0.0)
    ttft = [r.client_ttft_s * 1000 for r in results]
    e2e = [r.client_total_s * 1000 for r in results]
    itl = [gap * 1000 for r in results for gap in r.inter_token_s]
    lines = [
        "summary",
        f"  requests       {len(results)} completed",
        f"  tokens         {tokens} generated, {tokens / span if span else 0:.1f} tokens/s",
        f"  ttft (ms)      p50 {percentile(ttft, 50):.1f}  p95 {percentile(ttft, 95):.1f}  "
        f"max {max(ttft, default=0):.1f}",
        f"  itl (ms)       p50 {percentile(itl, 50):.1f}  p95 {percentile(itl, 95):.1f}",
        f"  e2e (ms)       p50 {percentile(e2e, 50):.1f}  p95 {percentile(e2e, 95):.1f}  "
        f"max {max(e2e, default=0):.1f}",
        f"  queue (ms)     mean {_mean_queue_ms(results):.1f} (server clock, submit to prefill)",
    ]
    return "\n".join(line for line in lines if line)


def _mean_queue_ms(results: list[Result]) -> float:
    return statistics.fmean([r.timings.queue_s for r in results]) * 1000 if results else 0.0
