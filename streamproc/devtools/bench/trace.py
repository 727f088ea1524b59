"""The arrival trace every peer replays: steady Poisson phases, a burst, a saturation wave.

Pure and seeded: the same settings give the same trace, so peers see identical load. Two
sizes: one for a real model (:func:`real_model_trace`: chat questions, loads a 2-core CPU
serves in minutes) and the default, for the tiny random model, whose steps are so cheap
that only thousands of requests measure anything but start-up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

WORDS = ["kafka", "stream", "token", "batch", "latency", "queue", "worker", "partition",
         "offset", "lag", "prompt", "model", "cache", "window", "throughput", "order"]


QUESTIONS = [
    "What is the capital of Japan?", "Name three fruits that are red.",
    "Explain what a message queue is.", "Give me a tip for sleeping better.",
    "What does a database index do?", "Write a short poem about the sea.",
    "How do plants make food?", "What is the boiling point of water?",
    "Suggest a name for a coffee shop.", "Why is the sky blue?",
    "Summarize the plot of Cinderella.", "What are the primary colors?",
    "How many legs does a spider have?", "Describe a cat in one sentence.",
    "What is a prime number?", "Translate 'good morning' into Spanish.",
    "List three uses of a paperclip.", "What causes rain?",
    "Give an example of a renewable energy source.", "What is the largest planet?",
    "How do you make a cup of tea?", "What is photosynthesis?",
    "Write a friendly greeting for a new colleague.", "Why do we have seasons?",
]


@dataclass(frozen=True)
class Arrival:
    at_s: float
    """Seconds after the start of the replay."""
    prompt: str
    max_new_tokens: int
    phase: str


@dataclass(frozen=True)
class TraceSettings:
    rates: tuple[float, ...] = (2.0, 5.0, 10.0)
    """Steady Poisson phases, requests per second."""
    phase_s: float = 10.0
    burst_factor: float = 10.0
    """The burst runs at this many times the middle rate..."""
    burst_s: float = 3.0
    """... for this long."""
    saturation_requests: int = 1000
    """Then this many at once, for saturated throughput."""
    gap_s: float = 2.0
    prompt_words: tuple[int, int] = (4, 48)
    max_new_tokens: int = 32
    seed: int = 7
    chat: bool = False
    """Prompts are chat questions (rendered with the model's template by the bench) rather
    than strings of words."""


def real_model_trace() -> TraceSettings:
    """What a 2-core CPU serves SmolLM2-135M through in about a minute a peer: requests at
    half and one a second, a 10x burst for 3 s, then 64 at once, the largest batch the
    ceiling is measured at, so the wave can run as full as the ceiling does; 16 tokens each."""
    return TraceSettings(rates=(0.5, 1.0), phase_s=10.0, burst_s=3.0, saturation_requests=64,
                         max_new_tokens=16, chat=True)


def build(settings: TraceSettings) -> list[Arrival]:
    rng = random.Random(settings.seed)
    arrivals: list[Arrival] = []
    clock = 0.0
    for rate in settings.rates:
        arrivals += _poisson(rng, settings, clock, settings.phase_s, rate, f"steady_{rate:g}")
        clock += settings.phase_s + settings.gap_s
    burst_rate = settings.rates[len(settings.rates) // 2] * settings.burst_factor
    arrivals += _poisson(rng, settings, clock, settings.burst_s, burst_rate, "burst")
    clock += settings.burst_s + settings.phase_s
    arrivals += [_arrival(rng, settings, clock, "saturation")
                 for _ in range(settings.saturation_requests)]
    return arrivals


def _poisson(rng: random.Random, settings: TraceSettings, start: float, length: float,
             rate: float, phase: str) -> list[Arrival]:
    out, at = [], start + rng.expovariate(rate)
    while at < start + length:
        out.append(_arrival(rng, settings, at, phase))
        at += rng.expovariate(rate)
    return out


def _arrival(rng: random.Random, settings: TraceSettings, at: float, phase: str) -> Arrival:
    if settings.chat:
        return Arrival(at, rng.choice(QUESTIONS), settings.max_new_tokens, phase)
    words = rng.randint(*settings.prompt_words)
    prompt = " ".join(rng.choice(WORDS) for _ in range(words))
    return Arrival(at, prompt, settings.max_new_tokens, phase)


def rendered(trace: list[Arrival], tokenizer: Any) -> list[Arrival]:
    """Each question as the model's chat template frames it for an answer: the text every
    peer then tokenizes alike (a peer built on ``generate()`` takes plain prompts)."""
    def frame(question: str) -> str:
        text: str = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                  add_generation_prompt=True, tokenize=False)
        return text
    framed = {q: frame(q) for q in {a.prompt for a in trace}}
    return [replace(a, prompt=framed[a.prompt]) for a in trace]
