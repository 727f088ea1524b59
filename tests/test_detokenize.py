from pathlib import Path

import pytest

from streamproc.engine.detokenize import IncrementalDetokenizer, StopMatcher
from streamproc.engine.loader import load_tokenizer


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
