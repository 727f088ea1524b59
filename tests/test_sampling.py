"""Batched sampling: the right distribution, top-p respected, and each row on its own."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from streamproc.engine.sampling import Sampler, choose_tokens, sampler_for, uniform_draw
from streamproc.wire import GenerationParams

PROBS = [0.5, 0.3, 0.15, 0.05]
DRAWS = 20_000


def frequencies(temperature: float, top_p: float) -> list[float]:
    """How often each token of PROBS is drawn, over DRAWS requests' first tokens."""
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(DRAWS, 1)
    samplers = [Sampler(seed, temperature, top_p) for seed in range(DRAWS)]
    counts = Counter(choose_tokens(logits, samplers, [0] * DRAWS))
    return [counts[token] / DRAWS for token in range(len(PROBS))]


def assert_close(seen: list[float], expected: list[float]) -> None:
    # Four standard deviations of a frequency over DRAWS draws at most.
    for token, (s, e) in enumerate(zip(seen, expected, strict=True)):
        assert abs(s - e) <= 4 * math.sqrt(0.25 / DRAWS), (token, seen, expected)


def test_draws_follow_the_distribution() -> None:
    assert_close(frequencies(1.0, 1.0), PROBS)


def test_temperature_sharpens_the_distribution() -> None:
    squared = [p ** 2 for p in PROBS]  # temperature 0.5 squares the probabilities
    assert_close(frequencies(0.5, 1.0), [p / sum(squared) for p in squared])


def test_top_p_draws_only_from_the_nucleus_in_proportion() -> None:
    # 0.5 + 0.3 reaches 0.8: the two least likely tokens are never drawn.
    assert_close(frequencies(1.0, 0.8), [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])


def test_a_token_without_mass_is_never_drawn() -> None:
    logits = torch.tensor([0.0, 0.0, -math.inf]).repeat(DRAWS, 1)
    samplers = [Sampler(seed, 1.0, 1.0) for seed in range(DRAWS)]
    assert 2 not in choose_tokens(logits, samplers, [7] * DRAWS)


def test_each_row_samples_on_its_own_and_greedy_rows_take_the_argmax() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=generator)
    samplers = [None, Sampler(1, 0.9, 0.95), None, Sampler(2, 1.3, 1.0),
                Sampler(3, 0.7, 0.5), None]
    positions = [0, 4, 9, 2, 30, 1]
    together = choose_tokens(logits, samplers, positions)
    alone = [choose_tokens(logits[row:row + 1], [s], [p])[0]
             for row, (s, p) in enumerate(zip(samplers, positions, strict=True))]
    assert together == alone
    for row in (0, 2, 5):
        assert together[row] == int(logits[row].argmax())


def test_a_request_draws_the_same_tokens_every_time_and_a_new_one_each_position() -> None:
    draws = [uniform_draw(42, position) for position in range(1000)]
    assert draws == [uniform_draw(42, position) for position in range(1000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert len(set(draws)) > 990
    assert abs(sum(draws) / len(draws) - 0.5) < 0.05
    assert draws[:10] != [uniform_draw(43, position) for position in range(10)]


@pytest.mark.parametrize("seed", [None, 7])
def test_a_sampled_request_gets_a_stable_seed_and_a_greedy_one_none(seed: int | None) -> None:
    params = GenerationParams(temperature=0.8, top_p=0.9, seed=seed)
    sampler = sampler_for(params, "request-1")
    assert sampler == sampler_for(params, "request-1")
    assert sampler is not None
    assert (sampler.temperature, sampler.top_p) == (0.8, 0.9)
    assert (sampler.seed == 7) == (seed == 7)
    assert sampler_for(GenerationParams(temperature=0.0, seed=seed), "request-1") is None


def test_a_temperature_too_small_to_divide_by_decodes_greedily() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    assert torch.isinf(logits / 1e-40).any()  # what sampling at it would divide by
    sampler = sampler_for(GenerationParams(temperature=1e-40), "request-1")
    assert sampler is None
    assert choose_tokens(logits, [sampler], [0]) == [0]
