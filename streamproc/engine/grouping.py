"""Splitting one step's prefill into forward passes of similar prompt lengths.

Prompts prefilled together are left-padded to the longest, and padding costs as
much compute as real tokens: with prompts of 6 to 174 tokens, one pass over a
whole admission spends a third or more of its work on padding. Every extra pass,
though, costs a fixed overhead (Python, kernel launches). So the prompts are
sorted by length and cut into contiguous groups minimizing

    sum over groups of (overhead + rows x longest prompt),

with the overhead in prompt-token units, as measured by
:func:`pass_overhead_tokens` on the engine's own model and device: on a GPU,
where padding is nearly free, it is large and prompts stay together; on a CPU it
is small and long prompts are kept apart from short ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_OVERHEAD_TOKENS = 256.0
"""Until measured: about a 2-layer model's on one CPU thread."""
MIN_OVERHEAD_TOKENS, MAX_OVERHEAD_TOKENS = 16.0, 65_536.0
_CUT_CANDIDATES = 16
"""Groups end only at one of this many evenly spaced positions of the sorted prompts,
so choosing them costs a few hundred operations, not a quadratic search."""


def prefill_groups(lengths: Sequence[int], overhead_tokens: float) -> list[list[int]]:
    """Indices into ``lengths``, grouped: each group sorted by length, every index once."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if len(order) <= 1:
        return [order] if order else []
    ends = _candidate_ends(len(order))
    sorted_lengths = [lengths[i] for i in order]
    # best[j]: the least cost of covering order[:ends[j]]; cut[j]: where its last group starts.
    best, cut = [0.0], [0]
    for j in range(1, len(ends)):
        end = ends[j]
        costs = [best[i] + overhead_tokens + (end - ends[i]) * sorted_lengths[end - 1]
                 for i in range(j)]
        start = min(range(j), key=costs.__getitem__)
        best.append(costs[start])
        cut.append(start)
    groups, j = [], len(ends) - 1
    while j > 0:
        groups.append(order[ends[cut[j]]:ends[j]])
        j = cut[j]
    return groups[::-1]


def pass_overhead_tokens(small_pass_s: float, large_pass_s: float, small_tokens: int,
                         large_tokens: int) -> float:
    """A pass's fixed cost in prompt tokens, from timing two prefills of different sizes."""
    per_token = (large_pass_s - small_pass_s) / max(1, large_tokens - small_tokens)
    if per_token <= 0 or not math.isfinite(per_token):
        return MAX_OVERHEAD_TOKENS  # no measurable cost per token: never split
    fixed = max(0.0, small_pass_s - per_token * small_tokens)
    return min(MAX_OVERHEAD_TOKENS, max(MIN_OVERHEAD_TOKENS, fixed / per_token))


def _candidate_ends(n: int) -> list[int]:
    step = max(1, math.ceil(n / _CUT_CANDIDATES))
    return [0, *range(step, n, step), n]
