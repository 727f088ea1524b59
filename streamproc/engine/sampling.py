"""Choosing the next token from logits, one generator per request.

Each request owns its random generator, seeded from its ``seed``, so a sampled
request's output does not depend on which other requests shared its batch.
"""

from __future__ import annotations

import torch

from streamproc.wire import GenerationParams


def make_generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def next_token(logits: torch.Tensor, params: GenerationParams,
               generator: torch.Generator | None) -> int:
    """Greedy when ``generator`` is None, else temperature and top-p sampling."""
    if generator is None:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
