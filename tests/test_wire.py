import json

import msgspec
import pytest

from streamproc import wire
from streamproc.openai.schema import json_schemas as openai_schemas


def test_request_round_trip_keeps_every_field() -> None:
    request = wire.GenerationRequest(
        request_id="r1",
        prompt=[wire.ChatMessage("user", "hi")],
        params=wire.GenerationParams(max_new_tokens=5, temperature=0.7, top_p=0.9,
                                     stop=["\n"], seed=3),
        priority=2, deadline=123.5, reply_topic="replies", submitted_at=100.0)
    assert wire.request_decoder.decode(wire.encode(request)) == request


def test_a_minimal_request_from_any_client_decodes_with_defaults() -> None:
    decoded = wire.request_decoder.decode(b'{"request_id": "a", "prompt": "hello"}')
    assert decoded.params == wire.GenerationParams()
    assert decoded.params.max_new_tokens == 64
    assert decoded.reply_topic == ""
    assert decoded.schema_version == wire.SCHEMA_VERSION


def test_unknown_fields_are_ignored_for_forward_compatibility_but_never_in_params() -> None:
    """A field a worker does not know is skipped, except a generation parameter: output that
    ignored it would pass for what was asked."""
    decoded = wire.request_decoder.decode(
        b'{"request_id": "a", "prompt": "x", "future_field": [1, 2], '
        b'"params": {"max_new_tokens": 3}}')
    assert decoded.params.max_new_tokens == 3
    with pytest.raises(msgspec.ValidationError, match="new_knob"):
        wire.request_decoder.decode(b'{"request_id": "a", "prompt": "x", '
                                    b'"params": {"max_new_tokens": 3, "new_knob": true}}')


@pytest.mark.parametrize("raw", [
    b'{"prompt": "no id"}',
    b'{"request_id": "", "prompt": "empty id"}',
    b'{"request_id": "a", "prompt": 42}',
    b'{"request_id": "a", "prompt": "x", "params": {"max_new_tokens": "many"}}',
])
def test_wrong_shapes_fail_validation(raw: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        wire.request_decoder.decode(raw)


def test_responses_are_a_tagged_union() -> None:
    usage, timings = wire.Usage(3, 4), wire.Timings(0.1, 0.2, 0.3)
    messages: list[wire.ResponseMessage] = [
        wire.TokenChunk("r", 0, "he", [1, 2]),
        wire.FinalMessage("r", 1, "length", usage, timings),
        wire.ErrorMessage("r", 0, "invalid_params", "bad"),
    ]
    for message in messages:
        encoded = wire.encode(message)
        assert json.loads(encoded)["type"] in {"chunk", "final", "error"}
        assert wire.response_decoder.decode(encoded) == message
    assert [wire.is_terminal(m) for m in messages] == [False, True, True]


def test_dead_letters_carry_the_original_bytes() -> None:
    letter = wire.DeadLetter("malformed_json", "boom", "t", 1, 7, b"\x00\xffraw", b"k")
    decoded = wire.dead_letter_decoder.decode(wire.encode(letter))
    assert decoded.original == b"\x00\xffraw"
    assert (decoded.topic, decoded.partition, decoded.offset) == ("t", 1, 7)


def test_exported_json_schemas_match_the_structs(tmp_path: object) -> None:
    from pathlib import Path

    exported = Path(__file__).resolve().parent.parent / "topics" / "schema"
    for name, schema in {**wire.json_schemas(), **openai_schemas()}.items():
        on_disk = json.loads((exported / f"{name}.schema.json").read_text())
        assert on_disk == schema, f"topics/schema/{name}.schema.json is stale: run make schema"
