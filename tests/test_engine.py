"""The engine against ``model.generate()`` on a real (tiny) transformers model."""

from __future__ import annotations

import random
import time

import pytest

from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.prefill import Hit
from streamproc.engine.sequence import PreparedRequest, Resumed, TokenEvent
from streamproc.wire import GenerationParams, GenerationRequest

from .helpers import reference_tokens

pytestmark = pytest.mark.model


def prepared(rid: str, prompt_ids: list[int], max_new: int, **params: object) -> PreparedRequest:
    request = GenerationRequest(request_id=rid, prompt="-",
                                params=GenerationParams(max_new_tokens=max_new, **params))  # type: ignore[arg-type]
    return PreparedRequest(request, prompt_ids, max_new, time.time())


def run_to_completion(engine: Engine, arrivals: list[list[PreparedRequest]]
                      ) -> dict[str, list[TokenEvent]]:
    """Feed one group of arrivals per step, then step until everything finished."""
    events: dict[str, list[TokenEvent]] = {}
    expected = sum(len(a) for a in arrivals)
    finished = 0
    step = 0
    while finished < expected:
        admit = arrivals[step] if step < len(arrivals) else []
        for event in engine.step(admit):
            events.setdefault(event.request_id, []).append(event)
            finished += event.outcome is not None
        step += 1
        assert step < 10_000
    return events


def tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_greedy_output_equals_generate_whatever_the_batch(loaded_model: LoadedModel) -> None:
    rng = random.Random(7)
    vocab = len(loaded_model.tokenizer)
    requests = [prepared(f"r{i}", [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 50))],
                         rng.randrange(1, 30)) for i in range(24)]
    # Arrivals staggered over steps: requests join a batch that is mid-decode.
    arrivals = [group for i in range(0, 24, 3) for group in (requests[i:i + 3], [])]
    events = run_to_completion(Engine(loaded_model), arrivals)
    for r in requests:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


def test_greedy_output_holds_when_one_step_prefills_in_several_passes(
        loaded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short and long prompts admitted together, with a pass so cheap that each length
    gets its own: the passes join the batch one after another within the step."""
    rng = random.Random(11)
    vocab = len(loaded_model.tokenizer)
    lengths = [2, 60, 3, 45, 1, 70, 20, 5, 33, 64]
    requests = [prepared(f"p{i}", [rng.randrange(3, vocab) for _ in range(n)],
                         rng.randrange(1, 20)) for i, n in enumerate(lengths)]
    engine = Engine(loaded_model)
    engine.prefill_overhead_tokens = 1.0
    passes: list[int] = []
    run_pass = engine._prefill_pass

    def counting_pass(batch: list[PreparedRequest], hits: list[Hit], rows: int,
                      shared: bool = False) -> list[TokenEvent]:
        passes.append(len(batch))
        return run_pass(batch, hits, rows, shared)

    monkeypatch.setattr(engine, "_prefill_pass", counting_pass)
    events = run_to_completion(engine, [requests[:5], [], requests[5:]])
    assert len(passes) > 2  # the split happened
    for r in requests:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


@pytest.mark.parametrize("seed", [1, 2])
def test_greedy_output_survives_cache_growth_and_long_late_prompts(
        loaded_model: LoadedModel, seed: int) -> None:
    """Short prompts first, then longer ones joining mid-decode (the cache widens on the
    left), long generations (it outgrows its columns), more rows than it started with,
    and sequences leaving in every order (rows move into the holes)."""
    rng = random.Random(seed)
    vocab = len(loaded_model.tokenizer)
    requests = [prepared(f"s{seed}-{i}", [rng.randrange(3, vocab)
                                          for _ in range(rng.randrange(1, 4 + 4 * i))],
                         rng.randrange(1, 80)) for i in range(30)]
    arrivals: list[list[PreparedRequest]] = []
    pending = list(requests)
    while pending:
        take = rng.randrange(0, 4)
        arrivals.append(pending[:take])
        pending = pending[take:]
    events = run_to_completion(Engine(loaded_model), arrivals)
    for r in requests:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


def test_a_sliding_window_moves_within_its_buffers_instead_of_allocating_new_ones(
        loaded_model: LoadedModel) -> None:
    """Short requests arriving one a step for long: the live window stays narrow while its
    right edge travels many times the buffers' width."""
    rng = random.Random(5)
    vocab = len(loaded_model.tokenizer)
    requests = [prepared(f"w{i}", [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 6))],
                         rng.randrange(4, 10)) for i in range(150)]
    engine = Engine(loaded_model)
    events = run_to_completion(engine, [[r] for r in requests])
    # 150 steps through buffers of 16-32 columns: reallocating whenever the window reached
    # their right edge made 22 allocations; moving it, none past the first growth.
    assert engine.kv_allocations <= 3
    for r in requests:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


def test_a_step_admitting_many_prompt_lengths_allocates_at_most_once(
        loaded_model: LoadedModel) -> None:
    """Ten passes of growing prompt lengths join a running batch in one step: the buffers
    are sized for all of them up front, not regrown pass by pass."""
    rng = random.Random(3)
    vocab = len(loaded_model.tokenizer)
    engine = Engine(loaded_model)
    engine.prefill_overhead_tokens = 1.0  # every length its own pass
    first = prepared("first", [5, 6, 7], 40)
    engine.step([first])
    before = engine.kv_allocations
    late = [prepared(f"l{n}", [rng.randrange(3, vocab) for _ in range(n)], 8)
            for n in (9, 17, 33, 50, 65, 80, 100, 130, 150, 200)]
    admitted: list[int] = []  # allocations counted after each step
    events: dict[str, list[TokenEvent]] = {}
    for step in range(10_000):
        for event in engine.step(late if step == 0 else []):
            events.setdefault(event.request_id, []).append(event)
        admitted.append(engine.kv_allocations - before)
        if not engine.num_running:
            break
    # Sized once for every pass; the one later allocation is the batch shrinking back
    # as rows leave.
    assert admitted[0] <= 1
    for r in late:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


def test_an_emptied_batch_keeps_its_buffers_for_the_next_requests(
        loaded_model: LoadedModel) -> None:
    engine = Engine(loaded_model)
    run_to_completion(engine, [[prepared("a", [5, 6, 7, 8, 9, 10], 20)]])
    assert engine.num_running == 0
    assert engine.kv_tokens == 0
    allocated = engine.kv_allocations
    after = prepared("b", [11, 12, 13], 15)
    events = run_to_completion(engine, [[after]])
    assert engine.kv_allocations == allocated
    assert tokens(events["b"]) == reference_tokens(loaded_model, [11, 12, 13], 15)


def test_the_buffers_shrink_back_once_a_long_prompt_has_left(
        loaded_model: LoadedModel) -> None:
    """One long prompt widens the buffers for every row; once it ends and short rows run
    on, the buffers go back to about the short rows' size, and those rows stay exact."""
    engine = Engine(loaded_model)
    short = [prepared(f"s{i}", [5 + i, 9, 14], 30) for i in range(2)]
    long = prepared("long", [7 + i % 50 for i in range(300)], 2)
    events: dict[str, list[TokenEvent]] = {}
    sizes: list[tuple[bool, int]] = []  # (long still running, buffer bytes) per step
    arrivals = [short, [long]]
    while engine.num_running or arrivals:
        for event in engine.step(arrivals.pop(0) if arrivals else []):
            events.setdefault(event.request_id, []).append(event)
        long_running = not any(e.outcome for e in events.get("long", []))
        sizes.append((long_running, engine.kv_buffer_bytes))
    alone = sizes[0][1]
    widest = max(size for _, size in sizes)
    after = [size for running, size in sizes if not running and size]
    assert widest >= 16 * alone
    assert after
    assert after[0] <= 4 * alone
    for r in short:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, r.max_new_tokens), r.request_id


def test_cancelling_or_abandoning_a_row_mid_batch_leaves_the_others_exact(
        loaded_model: LoadedModel) -> None:
    # Rows 0 and 1 leave while rows 2 and 3 run on: their KV rows move into the holes.
    requests = [prepared(f"r{i}", [5 + i, 9, 14 + i], 20) for i in range(4)]
    engine = Engine(loaded_model)
    events: dict[str, list[TokenEvent]] = {}
    for event in engine.step(requests) + engine.step([]):
        events.setdefault(event.request_id, []).append(event)
    cancel, abandon = frozenset({requests[0].key}), frozenset({requests[1].key})
    for event in engine.step([], abandon=abandon, cancel=cancel):
        events.setdefault(event.request_id, []).append(event)
    assert engine.num_running == 2
    cancelled = events["r0"][-1].outcome
    assert cancelled is not None
    assert cancelled.finish_reason == "cancelled"
    assert all(e.outcome is None for e in events["r1"])  # abandoned: no word at all
    while engine.num_running:
        for event in engine.step([]):
            events.setdefault(event.request_id, []).append(event)
    for r in requests[2:]:
        assert tokens(events[r.request_id]) == reference_tokens(
            loaded_model, r.prompt_ids, 20), r.request_id


def test_warm_up_leaves_the_engine_empty_and_output_unchanged(
        loaded_model: LoadedModel) -> None:
    engine = Engine(loaded_model)
    engine.warm_up()
    assert engine.num_running == 0
    assert engine.kv_tokens == 0
    request = prepared("after", [5, 6, 7, 8], 12)
    events = run_to_completion(engine, [[request]])
    assert tokens(events["after"]) == reference_tokens(loaded_model, [5, 6, 7, 8], 12)


def test_every_request_ends_with_exactly_one_outcome(loaded_model: LoadedModel) -> None:
    requests = [prepared(f"r{i}", [5 + i] * (i + 1), 4 + i) for i in range(6)]
    events = run_to_completion(Engine(loaded_model), [requests])
    for r in requests:
        outcomes = [e.outcome for e in events[r.request_id] if e.outcome is not None]
        assert len(outcomes) == 1
        assert events[r.request_id][-1].outcome is outcomes[0]
        assert outcomes[0].finish_reason == "length"
        assert outcomes[0].usage.completion_tokens == r.max_new_tokens
        assert outcomes[0].usage.prompt_tokens == len(r.prompt_ids)


def test_seeded_sampling_does_not_depend_on_batch_neighbours(loaded_model: LoadedModel) -> None:
    alone = run_to_completion(Engine(loaded_model), [[
        prepared("s", [10, 20, 30], 12, temperature=0.9, top_p=0.8, seed=42)]])
    crowd = [prepared(f"n{i}", [7] * (i + 2), 12, temperature=1.0) for i in range(5)]
    together = run_to_completion(Engine(loaded_model), [[
        *crowd, prepared("s", [10, 20, 30], 12, temperature=0.9, top_p=0.8, seed=42)]])
    assert tokens(alone["s"]) == tokens(together["s"])


def test_expired_requests_cost_no_compute(loaded_model: LoadedModel) -> None:
    request = GenerationRequest(request_id="late", prompt="-", deadline=time.time() - 1)
    late = PreparedRequest(request, [1, 2, 3], 8, time.time() - 2)
    engine = Engine(loaded_model)
    [event] = engine.step([late])
    assert event.outcome is not None
    assert event.outcome.finish_reason == "expired"
    assert event.token_ids == []
    assert engine.num_running == 0


def test_stop_strings_end_the_stream_without_emitting_them(loaded_model: LoadedModel) -> None:
    prompt = [11, 12, 13]
    free = run_to_completion(Engine(loaded_model), [[prepared("f", prompt, 30)]])
    full_text = "".join(e.text for e in free["f"])
    stop = full_text[10:13]
    assert len(stop) == 3, "the free run should produce enough text to pick a stop string"
    stopped = run_to_completion(Engine(loaded_model), [[prepared("s", prompt, 30, stop=[stop])]])
    text = "".join(e.text for e in stopped["s"])
    assert text == full_text[:full_text.index(stop)]
    assert stopped["s"][-1].outcome is not None
    assert stopped["s"][-1].outcome.finish_reason == "stop"


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 5}])
def test_a_resumed_request_continues_exactly_and_counts_the_whole_completion(
        loaded_model: LoadedModel, params: dict[str, object]) -> None:
    """Prefilling prompt + the published tokens continues the stream as one run would
    (greedy, or seeded: sampling draws by position in the whole completion), batched
    with requests that are not resumed."""
    rng = random.Random(3)
    vocab = len(loaded_model.tokenizer)
    prompt = [rng.randrange(3, vocab) for _ in range(17)]
    whole = run_to_completion(Engine(loaded_model), [[prepared("r", prompt, 24, **params)]])
    generated = tokens(whole["r"])
    others = [prepared(f"o{i}", [rng.randrange(3, vocab) for _ in range(9)], 12)
              for i in range(3)]
    for cut in (1, 10, 23):
        resumed = prepared("r", prompt, 24, **params).resume(
            Resumed(generated[:cut], "", cut))
        events = run_to_completion(Engine(loaded_model), [[others[0], resumed], others[1:]])
        assert generated[:cut] + tokens(events["r"]) == generated, cut
        outcome = events["r"][-1].outcome
        assert outcome is not None
        assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (17, 24)
