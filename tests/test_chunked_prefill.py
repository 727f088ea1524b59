"""Long prompts prefilled a chunk a step, on a real (tiny) transformers model."""

from __future__ import annotations

import random
import time

import pytest

from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.sequence import PreparedRequest
from streamproc.wire import GenerationParams, GenerationRequest

from .helpers import reference_tokens
from .test_engine import prepared, run_to_completion, tokens

pytestmark = pytest.mark.model


def random_prompt(rng: random.Random, loaded: LoadedModel, length: int) -> list[int]:
    return [rng.randrange(3, len(loaded.tokenizer)) for _ in range(length)]


def test_chunked_prompts_decode_exactly_as_generate(loaded_model: LoadedModel) -> None:
    """Long prompts of several chunk counts (one exactly a chunk long: not split) joining
    a batch mid-decode, two admitted in one step, beside short ones."""
    rng = random.Random(21)
    short = [prepared(f"s{i}", random_prompt(rng, loaded_model, rng.randrange(2, 12)), 40)
             for i in range(4)]
    long = [prepared(f"l{n}", random_prompt(rng, loaded_model, n), 20)
            for n in (16, 17, 33, 70, 129)]
    engine = Engine(loaded_model, prefill_chunk_tokens=16)
    events = run_to_completion(engine, [short[:2], long[:2], [], [short[2], *long[2:]],
                                        [short[3]]])
    for r in short + long:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


def test_running_sequences_keep_decoding_while_a_long_prompt_prefills(
        loaded_model: LoadedModel) -> None:
    engine = Engine(loaded_model, prefill_chunk_tokens=16)
    # No end-of-sequence token may end any of them early here.
    engine.step([prepared("a", [5, 6, 7], 30, ignore_eos=True),
                 prepared("b", [8, 9], 30, ignore_eos=True)])
    long = prepared("long", random_prompt(random.Random(2), loaded_model, 70), 5,
                    ignore_eos=True)
    first_token_step = None
    for step in range(1, 8):
        events = {e.request_id: e for e in engine.step([long] if step == 1 else [])}
        assert len(events["a"].token_ids) == 1
        assert len(events["b"].token_ids) == 1
        assert engine.num_running == 3  # the prefilling prompt holds its slot
        if "long" in events:
            first_token_step = step
            break
    assert first_token_step == 5  # 70 tokens in chunks of 16: 16, 16, 16, 16, 6


def test_whole_prompts_when_chunks_are_off(loaded_model: LoadedModel) -> None:
    engine = Engine(loaded_model, prefill_chunk_tokens=0)
    long = prepared("long", random_prompt(random.Random(4), loaded_model, 300), 3)
    [event] = engine.step([long])
    assert len(event.token_ids) == 1


def test_a_long_prompt_cancelled_abandoned_or_expired_mid_prefill_leaves_at_once(
        loaded_model: LoadedModel) -> None:
    engine = Engine(loaded_model, prefill_chunk_tokens=8)
    cancelled, abandoned = prepared("c", [5] * 40, 5), prepared("a", [6] * 40, 5)
    deadline = time.time() + 1.0
    expiring = PreparedRequest(
        GenerationRequest(request_id="e", prompt="-", deadline=deadline,
                          params=GenerationParams(max_new_tokens=5)), [7] * 40, 5, time.time())
    assert engine.step([cancelled, abandoned, expiring]) == []
    assert engine.num_running == 3
    [event] = engine.step([], abandon=frozenset({abandoned.key}),
                          cancel=frozenset({cancelled.key}))
    assert event.request_id == "c"
    assert event.outcome is not None
    assert event.outcome.finish_reason == "cancelled"
    assert event.token_ids == []
    assert engine.num_running == 1
    time.sleep(max(0.0, deadline - time.time()) + 0.05)
    [event] = engine.step([])
    assert event.request_id == "e"
    assert event.outcome is not None
    assert event.outcome.finish_reason == "expired"
    assert engine.num_running == 0
    assert engine.kv_tokens == 0
