from pathlib import Path

import pytest

from streamproc.engine.detokenize import IncrementalDetokenizer, StopMatcher, direct_decoder
from streamproc.engine.loader import load_tokenizer
from streamproc.engine.sequence import PreparedRequest, Resumed, Sequence, TokenEvent
from streamproc.wire import GenerationParams, GenerationRequest


def test_stop_matcher_passes_text_through_without_stops() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)


def test_stop_matcher_holds_back_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("D and more") == ("", True)


def test_stop_matcher_finds_a_stop_inside_one_delta() -> None:
    assert StopMatcher(["\n\n", "###"]).feed("a###b\n\n") == ("a", True)


def test_stop_matcher_flush_releases_held_text() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("xEN") == ("x", False)
    assert matcher.flush() == "EN"


@pytest.mark.model
def test_incremental_deltas_join_to_the_full_decode(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = "Kafka streams — naïve café ✓ 1234 {}[] backpressure"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prompt, generated = ids[:3], ids[3:]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(t) for t in generated] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(generated)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.model
def test_decoding_goes_straight_to_the_rust_tokenizer_only_when_the_text_is_the_same(
        tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert direct_decoder(tokenizer) is tokenizer.backend_tokenizer
    ids = tokenizer("a , b . c", add_special_tokens=False).input_ids
    assert direct_decoder(tokenizer).decode(ids, skip_special_tokens=True) == \
        tokenizer.decode(ids, skip_special_tokens=True)
    # Clean-up of spaces happens in the wrapper: keep it where the tokenizer asks for it.
    tokenizer.clean_up_tokenization_spaces = True
    assert direct_decoder(tokenizer) is tokenizer


@pytest.mark.model
@pytest.mark.parametrize("stop", [[], ["✓ 12"], ["é ✓"]])
def test_a_resumed_sequence_continues_the_text_exactly_wherever_it_was_cut(
        tiny_model_dir: Path, stop: list[str]) -> None:
    """Whatever readers held when the stream was cut (mid-character, with a stop string's
    start held back), a sequence resumed from it adds exactly the rest of the text."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer("go: Kafka — naïve café ✓ 1234 done", add_special_tokens=False).input_ids
    prompt, generated = ids[:3], ids[3:]
    request = GenerationRequest(request_id="r", prompt="-", params=GenerationParams(
        max_new_tokens=len(generated), stop=stop))
    base = PreparedRequest(request, prompt, len(generated), 0.0)

    def run(prepared: PreparedRequest, tokens: list[int]) -> list[TokenEvent]:
        sequence = Sequence.start(prepared, tokenizer, frozenset())
        events = []
        for token in tokens:
            events.append(sequence.advance(token, 0.0))
            if sequence.finished:
                break
        return events

    whole = run(base, generated)
    full_text = "".join(e.text for e in whole)
    assert whole[-1].outcome is not None
    for cut in range(len(whole)):
        held = whole[:cut]
        kept = [t for e in held for t in e.token_ids]
        resumed = base.resume(Resumed(kept, "".join(e.text for e in held), cut))
        rest = run(resumed, generated[len(kept):])
        assert "".join(e.text for e in held + rest) == full_text, cut
        outcome = rest[-1].outcome
        assert outcome is not None
        assert outcome.usage == whole[-1].outcome.usage
