"""A replayed stream, chunked differently, spliced by token and text offsets."""

from __future__ import annotations

import asyncio
import random
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc import wire
from streamproc.client import ResultStream

USAGE, TIMINGS = wire.Usage(1, 0), wire.Timings(0.0, 0.0, 0.0)


def chunked(tokens: list[int], texts: list[str], cuts: list[int], attempt: str
            ) -> list[wire.TokenChunk]:
    """The stream of ``tokens`` (one text delta each) cut into chunks before ``cuts``."""
    chunks, text_offset = [], 0
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(tokens)), len(tokens)]
    for seq, (start, end) in enumerate(pairwise(bounds)):
        text = "".join(texts[start:end])
        chunks.append(wire.TokenChunk("r", seq, text, tokens[start:end], attempt, start,
                                      text_offset))
        text_offset += len(text)
    return chunks


def final(seq: int, completion: int) -> wire.FinalMessage:
    return wire.FinalMessage("r", seq, "length", wire.Usage(1, completion), TIMINGS)


def collect(stream: ResultStream) -> tuple[list[int], str, list[wire.TokenChunk]]:
    async def read() -> list[wire.TokenChunk]:
        return [chunk async for chunk in stream]
    handed = asyncio.run(read())
    result = asyncio.run(stream.result())
    return result.token_ids, result.text, handed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=3), min_size=1, max_size=40), st.randoms(use_true_random=False),
       st.floats(0.0, 1.0))
def test_a_replay_chunked_differently_splices_exactly(texts: list[str], rng: random.Random,
                                                      died_at: float) -> None:
    tokens = list(range(len(texts)))
    first = chunked(tokens, texts, [rng.randrange(len(tokens) + 1) for _ in range(5)], "a")
    second = chunked(tokens, texts, [rng.randrange(len(tokens) + 1) for _ in range(5)], "b")
    stream = ResultStream("r")
    replayed: list[wire.ResponseMessage] = [*second, final(len(second), len(tokens))]
    for message in [*first[:int(died_at * len(first))], *replayed]:  # the first attempt died
        stream.deliver(message)
    got_tokens, got_text, handed = collect(stream)
    assert got_tokens == tokens
    assert got_text == "".join(texts)
    offsets = [c.offset for c in handed]
    assert offsets == sorted(set(offsets))  # nothing handed over twice


def test_duplicates_and_late_terminals_are_dropped() -> None:
    texts = ["he", "llo", "", " wo", "rld"]
    chunks = chunked([5, 6, 7, 8, 9], texts, [2, 3], "a")
    stream = ResultStream("r")
    assert all(stream.deliver(c) for c in chunks)
    assert not stream.deliver(chunks[1])  # the same chunk again (a redelivered record)
    assert stream.deliver(final(len(chunks), 5))
    assert not stream.deliver(final(len(chunks), 5))
    assert not stream.deliver(chunks[-1])
    tokens, text, _ = collect(stream)
    assert (tokens, text) == ([5, 6, 7, 8, 9], "hello world")


def test_text_without_tokens_is_kept() -> None:
    # A stop-string tail or a cancelled stream's held text arrives in a chunk of no tokens.
    stream = ResultStream("r")
    stream.deliver(wire.TokenChunk("r", 0, "ab", [1], "a", 0, 0))
    assert stream.deliver(wire.TokenChunk("r", 1, "c", [], "a", 1, 2))
    assert not stream.deliver(wire.TokenChunk("r", 1, "c", [], "b", 1, 2))
    stream.deliver(final(2, 1))
    assert collect(stream)[:2] == ([1], "abc")
