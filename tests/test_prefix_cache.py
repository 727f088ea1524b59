"""Shared prompt prefixes computed once: output unchanged, token for token.

Every engine test here checks greedy output against ``model.generate()`` on the whole
prompt, for prompts that share all, part or none of a cached prefix, joining a batch
that is mid-decode, prefilled in one pass or in chunks, and under eviction.
"""

from __future__ import annotations

import random

import pytest
import torch

from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.prefix_cache import PrefixCache
from streamproc.engine.sequence import PreparedRequest, Resumed

from .helpers import reference_tokens
from .test_engine import prepared, run_to_completion, tokens

pytestmark = pytest.mark.model
BLOCK = 16


def family(rng: random.Random, vocab: int, shared: int, count: int) -> list[list[int]]:
    """``count`` prompts that start with the same ``shared`` tokens, then differ."""
    head = [rng.randrange(3, vocab) for _ in range(shared)]
    return [head + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))]
            for _ in range(count)]


def assert_as_generate(loaded: LoadedModel, engine: Engine,
                       waves: list[list[PreparedRequest]]) -> None:
    """Each wave joins the batch while the one before still decodes."""
    arrivals = [group for wave in waves for group in (wave, [])]
    events = run_to_completion(engine, arrivals)
    for request in (r for wave in waves for r in wave):
        assert tokens(events[request.request_id]) == reference_tokens(
            loaded, request.prompt_ids, request.max_new_tokens), request.request_id


def test_prompts_sharing_all_part_or_none_of_a_cached_prefix_decode_as_generate(
        loaded_model: LoadedModel) -> None:
    rng = random.Random(5)
    vocab = len(loaded_model.tokenizer)
    instruction = family(rng, vocab, 70, 6)  # 4 whole blocks shared
    again = [list(instruction[0]), list(instruction[1])]  # the same prompts again: all
    partly = [instruction[2][:40] + [rng.randrange(3, vocab) for _ in range(25)]]
    short = [instruction[3][:9], instruction[4][:BLOCK + 1]]  # under a block; one past
    unrelated = family(rng, vocab, 0, 3)
    prompts = [*instruction, *again, *partly, *short, *unrelated]
    requests = [prepared(f"r{i}", p, rng.randrange(4, 20)) for i, p in enumerate(prompts)]
    engine = Engine(loaded_model)
    waves = [requests[:2], requests[2:6], requests[6:10], requests[10:]]
    assert_as_generate(loaded_model, engine, waves)
    stats = engine.prefixes.stats
    # Wave 1 fills the cache; wave 2's four share its 4 blocks; the rest hit as designed.
    assert stats.hit_tokens >= 4 * 64 + 2 * 64 + 32 + 16
    assert stats.lookup_tokens == sum(len(p) for p in prompts)


def test_a_cold_burst_of_one_instruction_prefills_the_shared_part_once(
        loaded_model: LoadedModel) -> None:
    """Six records of one instruction admitted in one step, nothing cached: one of them
    prefills the instruction, the other five start from it."""
    rng = random.Random(21)
    prompts = family(rng, len(loaded_model.tokenizer), 64, 6)
    requests = [prepared(f"b{i}", p, 8) for i, p in enumerate(prompts)]
    engine = Engine(loaded_model)
    assert_as_generate(loaded_model, engine, [requests])
    assert engine.prefixes.stats.hit_tokens == 5 * 64


def test_a_hit_leaves_at_least_one_token_to_compute_and_needs_the_whole_chain() -> None:
    cache = PrefixCache(capacity_bytes=1 << 20, block_tokens=4)
    prompt = list(range(12))
    cache.insert(prompt, lambda: [(torch.zeros(2, 12, 3), torch.ones(2, 12, 3))], force=True)
    length, layers = cache.lookup(prompt)
    assert length == 8  # 3 whole blocks cached, but the last token must be computed
    assert layers[0][0].shape == (2, 8, 3)
    assert cache.lookup([*prompt, 99])[0] == 12
    # The same tokens after another start are another prefix.
    assert cache.lookup([7, *prompt[1:]])[0] == 0


def test_a_block_is_stored_when_a_second_prompt_has_it() -> None:
    """Unique prompts cost a hash each, not a copy of their keys and values."""
    cache = PrefixCache(capacity_bytes=1 << 20, block_tokens=4)
    copies = []

    def kv() -> list[tuple[torch.Tensor, torch.Tensor]]:
        copies.append(1)
        return [(torch.zeros(1, 9, 2), torch.zeros(1, 9, 2))]
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8, 9], kv)
    assert (copies, cache.stats.cached_bytes) == ([], 0)
    cache.insert([1, 2, 3, 4, 0, 0, 0, 0, 0], kv)  # shares the first block only
    assert len(copies) == 1
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 4


def test_eviction_keeps_the_cache_within_its_bytes_least_recently_used_first(
        loaded_model: LoadedModel) -> None:
    rng = random.Random(9)
    vocab = len(loaded_model.tokenizer)
    probe = Engine(loaded_model)
    once = list(range(3, 3 + BLOCK + 1))
    run_to_completion(probe, [[prepared("seen", once, 1)], [prepared("stored", once, 1)]])
    block_bytes = probe.prefixes.stats.cached_bytes
    engine = Engine(loaded_model, prefix_cache_bytes=3 * block_bytes)
    prompts = [p for _ in range(3) for p in family(rng, vocab, 40, 2)]
    requests = [prepared(f"e{i}", p, 8) for i, p in enumerate(prompts)]
    assert_as_generate(loaded_model, engine, [requests[i:i + 2] for i in range(0, 6, 2)])
    stats = engine.prefixes.stats
    assert stats.evictions > 0
    assert stats.cached_bytes <= 3 * block_bytes


def test_long_prompts_prefilled_in_chunks_start_after_their_cached_prefix(
        loaded_model: LoadedModel) -> None:
    rng = random.Random(13)
    vocab = len(loaded_model.tokenizer)
    prompts = family(rng, vocab, 90, 4)
    requests = [prepared(f"c{i}", p, 10) for i, p in enumerate(prompts)]
    engine = Engine(loaded_model, prefill_chunk_tokens=24)
    assert_as_generate(loaded_model, engine, [requests[:1], requests[1:3], requests[3:]])
    # The first leaves the names, the second stores the blocks, the other two hit.
    assert engine.prefixes.stats.hit_tokens >= 2 * 80


def test_a_request_resumed_after_a_takeover_starts_from_its_cached_prompt(
        loaded_model: LoadedModel) -> None:
    """The new owner prefills prompt + the published tokens: the prompt part hits where
    this worker saw the prompt before, and the continuation is still generate()'s."""
    rng = random.Random(23)
    prompt = [rng.randrange(3, len(loaded_model.tokenizer)) for _ in range(48)]
    engine = Engine(loaded_model)
    whole = run_to_completion(engine, [[prepared("w1", prompt, 30)], [],
                                       [prepared("w2", prompt, 30)]])
    generated = tokens(whole["w1"])
    before = engine.prefixes.stats.hit_tokens
    resumed = prepared("w3", prompt, 30).resume(Resumed(generated[:12], "", 12))
    events = run_to_completion(engine, [[resumed]])
    assert generated[:12] + tokens(events["w3"]) == generated
    assert engine.prefixes.stats.hit_tokens - before >= 48


def test_off_means_off(loaded_model: LoadedModel) -> None:
    rng = random.Random(17)
    prompts = family(rng, len(loaded_model.tokenizer), 50, 4)
    engine = Engine(loaded_model, prefix_cache_bytes=0)
    assert_as_generate(loaded_model, engine,
                       [[prepared(f"o{i}", p, 6)] for i, p in enumerate(prompts)])
    assert engine.prefixes.stats.hit_tokens == 0
    assert engine.prefixes.stats.cached_bytes == 0


def test_a_real_chat_models_system_prompt_and_examples_are_computed_once(
        smollm2: LoadedModel) -> None:
    """SmolLM2 with its chat template: one instruction and two examples in front of
    every record, as a classification job has them."""
    tokenizer = smollm2.tokenizer
    system = ("You label support tickets as billing, outage or other. Answer with one word. "
              "Examples: 'I was charged twice' is billing; 'the site is down' is outage.")
    records = ["My invoice shows the wrong amount.", "Nothing loads since this morning.",
               "How do I change my avatar?", "Refund my last payment please."]
    prompts = [list(tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": r}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for r in records]
    requests = [prepared(f"t{i}", p, 6) for i, p in enumerate(prompts)]
    engine = Engine(smollm2)
    assert_as_generate(smollm2, engine, [requests[:1], requests[1:]])
    shared = len(prompts[0]) - len(tokenizer(records[0]).input_ids) - 8
    # The first leaves the names; of the three arriving together, one stores, two hit.
    assert engine.prefixes.stats.hit_tokens >= 2 * (shared // BLOCK) * BLOCK
