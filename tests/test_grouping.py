"""Splitting a step's prefill into passes of similar prompt lengths: pure rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamproc.engine.grouping import (
    MAX_OVERHEAD_TOKENS,
    pass_overhead_tokens,
    prefill_groups,
)


def cost(groups: list[list[int]], lengths: list[int], overhead: float) -> float:
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def test_short_and_long_prompts_go_apart_when_padding_costs_more_than_a_pass() -> None:
    lengths = [4] * 10 + [200, 190]
    groups = prefill_groups(lengths, overhead_tokens=16)
    assert sorted(map(sorted, groups)) == [list(range(10)), [10, 11]]


def test_prompts_stay_together_when_a_pass_costs_more_than_the_padding() -> None:
    lengths = [4] * 10 + [200, 190]
    assert prefill_groups(lengths, overhead_tokens=MAX_OVERHEAD_TOKENS) == \
        [sorted(range(12), key=lengths.__getitem__)]


def test_nothing_to_prefill_means_no_pass() -> None:
    assert prefill_groups([], 100) == []
    assert prefill_groups([7], 100) == [[0]]


@given(st.lists(st.integers(1, 4000), max_size=300), st.floats(1, 10_000))
def test_groups_cover_every_prompt_once_and_never_cost_more_than_one_pass(
        lengths: list[int], overhead: float) -> None:
    groups = prefill_groups(lengths, overhead)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # sorted within and across groups
    if lengths:
        assert cost(groups, lengths, overhead) <= cost([flat], lengths, overhead)


def test_pass_overhead_from_two_timed_prefills() -> None:
    # 1 ms for 16 tokens, 5 ms for 1024: ~4 us a token, ~0.94 ms fixed = ~236 tokens.
    assert round(pass_overhead_tokens(0.001, 0.005, 16, 1024)) == 236
    # No measurable cost per token (a GPU at these sizes): never split.
    assert pass_overhead_tokens(0.002, 0.002, 16, 1024) == MAX_OVERHEAD_TOKENS
