"""The prefix cache on the commonest queue job (``make bench-prefix``).

``python -m streamproc.devtools.bench.shared_prefix [--records N] [--rounds R] ...``

One instruction (a system prompt with examples, a few hundred tokens through the chat
template) in front of every record, short records, short answers: the engine alone on the
real model, records admitted a few per step as the adaptive window admits them, with the
prefix cache on and off, side by side in alternating rounds (this machine is shared and
noisy: only the ratios are compared). The same with unique prompts of the same length
measures what the cache costs when nothing hits.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from streamproc.config import DEFAULT_MODEL, DEFAULT_PREFIX_CACHE_BYTES
from streamproc.engine import catalog
from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel, load_model
from streamproc.engine.sequence import PreparedRequest
from streamproc.metrics.stats import percentile
from streamproc.wire import GenerationParams, GenerationRequest

INSTRUCTION = (
    "You are a support triage assistant. Read the customer's message and answer with "
    "exactly one label from this list: billing, outage, account, shipping, feedback, other. "
    "Rules: a charge, refund, invoice or price is billing; anything that does not load, "
    "times out or errors is outage; passwords, logins, profiles and settings are account; "
    "parcels, delivery dates and addresses are shipping; praise or complaints about the "
    "product itself are feedback; everything else is other. Do not explain. Examples: "
    "'I was charged twice for March' -> billing. 'The dashboard shows a 502 since noon' -> "
    "outage. 'I cannot reset my password, the link expired' -> account. 'My parcel has "
    "been stuck in Leipzig for a week' -> shipping. 'Love the new dark mode!' -> feedback. "
    "'Do you have an office in Lisbon?' -> other. 'Why is my bill higher this month?' -> "
    "billing. 'Login page keeps spinning forever' -> outage. 'Please change the email on "
    "my account' -> account. 'Can you deliver to a PO box?' -> shipping.")
RECORDS = ["Refund my last order please.", "Nothing loads on the mobile app.",
           "How do I enable two-factor login?", "Where is my package?",
           "The new search is great.", "Are you hiring interns?",
           "Invoice 4411 lists the wrong VAT.", "API calls fail with timeouts."]


@dataclass(frozen=True)
class Run:
    seconds: float
    ttft_s: list[float]
    tokens: int


def chat_texts(tokenizer: Any, count: int, *, shared: bool) -> list[str]:
    """``count`` prompts as the chat template renders them: the instruction then a record
    (``shared``), or, as a control, the instruction's words shuffled differently for each
    so nothing is shared."""
    texts = []
    for i in range(count):
        words = INSTRUCTION.split()
        if not shared:
            random.Random(i).shuffle(words)
        system = " ".join(words)
        record = f"Ticket {i}: {RECORDS[i % len(RECORDS)]}"
        texts.append(str(tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": record}],
            add_generation_prompt=True, tokenize=False)))
    return texts


def chat_prompts(loaded: LoadedModel, count: int, *, shared: bool) -> list[list[int]]:
    """:func:`chat_texts` tokenized, as a worker tokenizes a prompt."""
    return [list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
            for text in chat_texts(loaded.tokenizer, count, shared=shared)]


def run_once(loaded: LoadedModel, prompts: list[list[int]], cache_bytes: int,
             per_step: int, new_tokens: int) -> Run:
    engine = Engine(loaded, prefix_cache_bytes=cache_bytes)
    engine.warm_up()
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    pending = [PreparedRequest(GenerationRequest(request_id=f"r{i}", prompt="-",
                                                 params=params), p, new_tokens, 0.0)
               for i, p in enumerate(prompts)]
    admitted_at: dict[str, float] = {}
    first: dict[str, float] = {}
    finished, produced = 0, 0
    began = time.perf_counter()
    while finished < len(prompts):
        wave, pending = pending[:per_step], pending[per_step:]
        now = time.perf_counter()
        admitted_at.update((p.request_id, now) for p in wave)
        for event in engine.step(wave):
            produced += len(event.token_ids)
            first.setdefault(event.request_id, time.perf_counter())
            finished += event.outcome is not None
    seconds = time.perf_counter() - began
    return Run(seconds, [first[r] - admitted_at[r] for r in admitted_at], produced)


def compare(loaded: LoadedModel, prompts: list[list[int]], rounds: int, per_step: int,
            new_tokens: int) -> tuple[float, float]:
    """Median over rounds of (cache-on throughput / cache-off), and of TTFT p50 on / off;
    the two runs of a round back to back, their order alternating."""
    speed, ttft = [], []
    for r in range(rounds):
        order = [DEFAULT_PREFIX_CACHE_BYTES, 0] if r % 2 == 0 else [0, DEFAULT_PREFIX_CACHE_BYTES]
        runs = {b: run_once(loaded, prompts, b, per_step, new_tokens) for b in order}
        on, off = runs[DEFAULT_PREFIX_CACHE_BYTES], runs[0]
        speed.append((on.tokens / on.seconds) / (off.tokens / off.seconds))
        ttft.append(percentile(sorted(on.ttft_s), 50) / percentile(sorted(off.ttft_s), 50))
    return statistics.median(speed), statistics.median(ttft)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamproc.devtools.bench.shared_prefix",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--per-step", type=int, default=4,
                        help="records admitted per engine step (default 4)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    loaded = load_model(catalog.resolve(args.model), "auto")
    shared = chat_prompts(loaded, args.records, shared=True)
    unique = chat_prompts(loaded, args.records, shared=False)
    print(f"{args.records} records, prompts of {len(shared[0])} tokens, {args.new_tokens} new "
          f"tokens each, {args.per_step} admitted per step, {args.rounds} rounds; ratios are "
          "prefix cache on / off, medians over rounds")
    speed, ttft = compare(loaded, shared, args.rounds, args.per_step, args.new_tokens)
    print(f"shared instruction: throughput {speed:.2f}x, TTFT p50 {ttft:.2f}x")
    speed, ttft = compare(loaded, unique, args.rounds, args.per_step, args.new_tokens)
    print(f"unique prompts (no hits): throughput {speed:.3f}x, TTFT p50 {ttft:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
