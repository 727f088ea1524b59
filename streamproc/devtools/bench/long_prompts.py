"""Long prompts joining a running batch, prefilled whole or in chunks (engine alone).

A decode batch of short requests, refilled as they finish, while a long prompt
arrives every few steps. Every running sequence waits one engine step for its
next token, so the step times are their inter-token gaps: a long prompt
prefilled whole makes one long step; in chunks, several short ones.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from streamproc import wire
from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.sequence import PreparedRequest
from streamproc.metrics.stats import percentile

RUNNING = 32
SHORT_PROMPT, SHORT_NEW = 20, 64
LONG_PROMPT, LONG_NEW = 900, 16
LONG_EVERY_STEPS = 25
WARM_STEPS, MEASURED_STEPS = 150, 600
"""Measuring starts once the buffers have grown to hold a long prompt."""
ROUNDS = 3


def compare_chunk_sizes(loaded: LoadedModel, chunk_sizes: Sequence[int], *,
                        rounds: int = ROUNDS, **steps: int) -> dict[str, dict[str, float]]:
    """Each chunk size (0: whole prompts) run ``rounds`` times, taking turns, so a change in
    the machine's speed falls on all alike; per size (``whole`` or ``chunks_N``), the median
    of each figure over its rounds."""
    results: dict[int, list[dict[str, Any]]] = {size: [] for size in chunk_sizes}
    for _ in range(rounds):
        for size in chunk_sizes:
            results[size].append(long_prompt_run(loaded, size, **steps))
    return {(f"chunks_{size}" if size else "whole"):
            {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for size, runs in results.items()}


def long_prompt_run(loaded: LoadedModel, chunk_tokens: int, *, warm_steps: int = WARM_STEPS,
                    measured_steps: int = MEASURED_STEPS) -> dict[str, Any]:
    """With ``chunk_tokens`` (0: whole prompts): tokens/s, the step time's p50, and the
    longest step while each long prompt was prefilled (its median and max over the long
    prompts, ms): what it cost the running sequences' inter-token gap."""
    engine = Engine(loaded, prefill_chunk_tokens=chunk_tokens)
    engine.warm_up()
    make = _Requests(loaded)
    steps: list[float] = []
    prefilling: dict[str, float] = {}
    """Long prompts without a first token yet: the longest step since they arrived."""
    spikes: list[float] = []
    generated, started = 0, time.perf_counter()
    for step in range(-warm_steps, measured_steps):
        if step == 0:
            steps, spikes, generated, started = [], [], 0, time.perf_counter()
        admitted = [make.short() for _ in range(RUNNING - engine.num_running)]
        if step % LONG_EVERY_STEPS == 0:
            admitted.append(make.long())
            prefilling[admitted[-1].request_id] = 0.0
        step_started = time.perf_counter()
        events = engine.step(admitted)
        took = time.perf_counter() - step_started
        steps.append(took)
        generated += sum(len(e.token_ids) for e in events)
        for rid in prefilling:
            prefilling[rid] = max(prefilling[rid], took)
        spikes += [prefilling.pop(e.request_id) for e in events
                   if e.request_id in prefilling and e.token_ids]
    ms = 1000.0
    return {"chunk_tokens": chunk_tokens,
            "tokens_per_s": generated / (time.perf_counter() - started),
            "step_p50_ms": percentile(steps, 50) * ms,
            "long_prompt_step_p50_ms": percentile(spikes, 50) * ms,
            "long_prompt_step_max_ms": max(spikes, default=0.0) * ms}


class _Requests:
    def __init__(self, loaded: LoadedModel) -> None:
        self._rng = random.Random(0)
        self._vocab = len(loaded.tokenizer)
        # The longest prompt the model takes with room for its tokens.
        self._long = min(LONG_PROMPT, loaded.max_context - LONG_NEW)
        self._count = 0

    def short(self) -> PreparedRequest:
        return self._make(SHORT_PROMPT, SHORT_NEW)

    def long(self) -> PreparedRequest:
        return self._make(self._long, LONG_NEW)

    def _make(self, length: int, new: int) -> PreparedRequest:
        self._count += 1
        params = wire.GenerationParams(max_new_tokens=new, ignore_eos=True)
        request = wire.GenerationRequest(request_id=f"long-bench-{self._count}", prompt="-",
                                         params=params)
        # Ids past the first few, which tokenizers keep for special tokens.
        ids = [self._rng.randrange(3, self._vocab) for _ in range(length)]
        return PreparedRequest(request, ids, new, time.time())
