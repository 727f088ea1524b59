"""Choosing the next token from logits, one generator per request.

Each request owns its random generator, seeded from its ``seed``, so a sampled
request's output does not depend on which other requests shared its batch. A
request without a seed gets one derived from its request id: a request that a
second worker generates again after a crash then produces the same tokens, so
its replayed stream splices exactly onto what subscribers already received.
"""

from __future__ import annotations

import hashlib

import torch

from streamproc.wire import GenerationParams


def make_generator(params: GenerationParams, device: torch.device,
                   request_id: str) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else default_seed(request_id))
    return generator


def default_seed(request_id: str) -> int:
    """Stable across processes and machines (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") >> 1


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
