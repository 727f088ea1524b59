"""The reader rule (streamproc.follow, docs/wire-schema.md) on streams a takeover cut."""

from __future__ import annotations

import asyncio
import random
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc import wire
from streamproc.client import ResultStream
from streamproc.follow import Follower

TIMINGS = wire.Timings(0.0, 0.0, 0.0)


def chunked(texts: list[str], cuts: list[int], attempt: str, *, first_token: int = 0,
            first_seq: int = 0, text_offset: int = 0) -> list[wire.TokenChunk]:
    """A stream of one token per text, cut into chunks before ``cuts``."""
    chunks = []
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(texts)), len(texts)]
    for seq, (start, end) in enumerate(pairwise(bounds), first_seq):
        text = "".join(texts[start:end])
        tokens = list(range(first_token + start, first_token + end))
        chunks.append(wire.TokenChunk("r", seq, text, tokens, attempt, first_token + start,
                                      text_offset))
        text_offset += len(text)
    return chunks


def final(seq: int, completion: int, attempt: str) -> wire.FinalMessage:
    return wire.FinalMessage("r", seq, "length", wire.Usage(1, completion), TIMINGS,
                             attempt=attempt)


def read(messages: list[wire.ResponseMessage]) -> tuple[list[int], str, wire.ResponseMessage]:
    """What the Python client makes of ``messages``, checked against the bare rule."""
    stream = ResultStream("r")
    for message in messages:
        stream.deliver(message)
    result = asyncio.run(stream.result())
    follower = Follower("r")
    for message in messages:
        follower.take(message)
    assert (follower.tokens, follower.joined_text) == (result.token_ids, result.text)
    assert follower.end is not None
    return result.token_ids, result.text, follower.end


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=3), min_size=2, max_size=40), st.randoms(use_true_random=False),
       st.floats(0.0, 1.0), st.integers(0, 6))
def test_a_takeover_continues_the_stream_and_the_zombie_is_ignored(
        texts: list[str], rng: random.Random, cut: float, zombie_after: int) -> None:
    """The old attempt published some chunks, then a takeover; the new attempt continues
    from what precedes the takeover, while the old one (a zombie) goes on writing its own
    continuation after it. Readers hold the first part followed by the new attempt's."""
    old = chunked(texts, [rng.randrange(len(texts)) for _ in range(4)], "old")
    kept = old[:int(cut * len(old))]
    held = sum(len(c.token_ids) for c in kept)
    held_text = sum(len(c.text) for c in kept)
    new_texts = [t.upper() + "!" for t in texts[held:]]
    new = chunked(new_texts, [rng.randrange(len(new_texts) + 1) for _ in range(3)], "new",
                  first_token=held, first_seq=len(kept), text_offset=held_text)
    zombie = old[len(kept):len(kept) + zombie_after]
    messages: list[wire.ResponseMessage] = [*kept, wire.Takeover("r", "new")]
    for i, chunk in enumerate(new):  # the zombie's writes interleave with the new owner's
        messages += [chunk, *zombie[i:i + 1]]
    messages += [*zombie[len(new):], final(len(kept) + len(new), len(texts), "new"),
                 final(99, len(texts), "old")]
    tokens, text, end = read(messages)
    assert tokens == list(range(len(texts)))
    assert text == "".join(texts[:held]) + "".join(new_texts)
    assert end.attempt == "new"


def test_the_first_message_picks_the_attempt_and_the_first_terminal_ends_it() -> None:
    a = chunked(["he", "llo"], [1], "a")
    late = chunked(["he", "LLO", "!"], [1], "b")  # a second, unannounced attempt
    tokens, text, end = read([a[0], late[0], a[1], late[1], final(2, 2, "a"), final(9, 3, "b"),
                              wire.Takeover("r", "c")])
    assert (tokens, text, end.attempt) == ([0, 1], "hello", "a")


def test_a_takeover_before_anything_was_published_starts_the_stream() -> None:
    new = chunked(["x", "y"], [], "new")
    stale = chunked(["p", "q"], [1], "old")  # written by the old owner after the takeover
    tokens, text, end = read([wire.Takeover("r", "new"), stale[0], *new, stale[1],
                              final(1, 2, "new")])
    assert (tokens, text, end.attempt) == ([0, 1], "xy", "new")


def test_a_second_takeover_switches_again_and_keeps_what_the_first_added() -> None:
    a = chunked(["a"], [], "a")
    b = chunked(["b"], [], "b", first_token=1, first_seq=1, text_offset=1)
    c = chunked(["c"], [], "c", first_token=2, first_seq=2, text_offset=2)
    tokens, text, _ = read([a[0], wire.Takeover("r", "b"), b[0], wire.Takeover("r", "c"),
                            c[0], final(1, 2, "b"), final(3, 3, "c")])
    assert (tokens, text) == ([0, 1, 2], "abc")


def test_an_error_ends_the_stream_and_a_client_raises_it() -> None:
    stream = ResultStream("r")
    stream.deliver(wire.Takeover("r", "p"))
    assert stream.deliver(wire.ErrorMessage("r", 0, "poison", "died thrice", False, "p"))
    assert not stream.deliver(final(1, 0, "p"))


def test_text_without_tokens_is_kept() -> None:
    # A stop-string tail or a cancelled stream's held text arrives in a chunk of no tokens.
    stream = ResultStream("r")
    stream.deliver(wire.TokenChunk("r", 0, "ab", [1], "a", 0, 0))
    assert stream.deliver(wire.TokenChunk("r", 1, "c", [], "a", 1, 2))
    assert not stream.deliver(wire.TokenChunk("r", 1, "c", [], "b", 1, 2))
