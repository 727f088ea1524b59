"""A stream in OpenAI's shapes: valid OpenAI objects, and native messages all the same."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from streamproc import wire
from streamproc.follow import Follower
from streamproc.openai.replies import OpenAIStream

from .openai_shapes import (
    check_chat_chunk,
    check_error_body,
    check_output_line,
    check_text_chunk,
)

TIMINGS = wire.Timings(0.1, 0.2, 0.3)
LOGPROB = wire.TokenLogprob("lo", -0.25, [wire.TopLogprob(7, "lo", -0.25),
                                         wire.TopLogprob(8, "la", -1.5)])


def reply(endpoint: str = "chat.completions", include_usage: bool = False) -> wire.OpenAIReply:
    return wire.OpenAIReply(endpoint, "line-1", "smollm2", include_usage)  # type: ignore[arg-type]


def chunk(seq: int, text: str, offset: int, text_offset: int, *,
          logprobs: list[wire.TokenLogprob] | None = None) -> wire.TokenChunk:
    return wire.TokenChunk("line-1", seq, text, [10 + seq] if text else [], "a1", offset,
                           text_offset, msgspec.UNSET if logprobs is None else logprobs)


def render_stream(stream: OpenAIStream, *, usage: bool) -> list[bytes]:
    out = [stream.chunk(chunk(0, "Hel", 0, 0, logprobs=[LOGPROB])),
           stream.chunk(chunk(1, "lo!", 1, 3, logprobs=[LOGPROB]))]
    out.append(stream.finish_chunk(chunk(2, "", 2, 6), "stop"))
    total = wire.Usage(5, 2)
    if usage:
        out.append(stream.usage_chunk(chunk(3, "", 2, 6), total))
    out.append(stream.final(wire.FinalMessage("line-1", len(out), "stop", total, TIMINGS,
                                              attempt="a1")))
    return out


@pytest.mark.parametrize("usage", [False, True])
def test_a_chat_stream_is_openai_chunks_then_a_batch_output_line(usage: bool) -> None:
    messages = [json.loads(m) for m in render_stream(OpenAIStream(reply(), 1700000000),
                                                     usage=usage)]
    *chunks, last = messages
    for c in chunks:
        check_chat_chunk(c)
    check_output_line(last)
    assert {c["id"] for c in chunks} == {last["response"]["body"]["id"]}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    content = "".join(c["choices"][0]["delta"].get("content", "")
                      for c in chunks if c["choices"])
    body = last["response"]["body"]
    assert content == body["choices"][0]["message"]["content"] == "Hello!"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"  # the finish chunk
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert [e["token"] for e in body["choices"][0]["logprobs"]["content"]] == ["lo", "lo"]
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1] == {
        "token": "la", "logprob": -1.5, "bytes": [108, 97]}
    assert (chunks[-1]["usage"] is not None) == usage
    assert last["custom_id"] == "line-1"


def test_the_native_reader_rule_reads_an_openai_stream_unchanged() -> None:
    follower = Follower("line-1")
    for message in render_stream(OpenAIStream(reply(), 1), usage=True):
        follower.take(wire.response_decoder.decode(message))
    assert follower.joined_text == "Hello!"
    assert follower.tokens == [10, 11]
    assert follower.logprobs == [LOGPROB, LOGPROB]
    assert isinstance(follower.end, wire.FinalMessage)
    assert follower.end.usage == wire.Usage(5, 2)


def test_a_completions_stream_is_text_completion_objects() -> None:
    stream = OpenAIStream(reply("completions"), 1)
    messages = [json.loads(m) for m in render_stream(stream, usage=False)]
    *chunks, last = messages
    for c in chunks:
        check_text_chunk(c)
    check_output_line(last)
    body = last["response"]["body"]
    assert body["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    assert body["choices"][0]["logprobs"]["text_offset"] == [0, 2]
    assert body["choices"][0]["logprobs"]["top_logprobs"][0] == {"lo": -0.25, "la": -1.5}


def test_a_stream_taken_over_answers_with_the_whole_completion() -> None:
    """The new owner starts from what the old attempt published: its text, its
    log-probabilities, and no second role delta."""
    stream = OpenAIStream(reply(), 1, resumed_text="Hel", resumed_logprobs=[LOGPROB],
                          first_seq=1)
    first = json.loads(stream.chunk(chunk(1, "lo!", 1, 3, logprobs=[LOGPROB])))
    assert first["choices"][0]["delta"] == {"content": "lo!"}
    last = json.loads(stream.final(wire.FinalMessage("line-1", 2, "length", wire.Usage(5, 2),
                                                     TIMINGS)))
    choice = last["response"]["body"]["choices"][0]
    assert choice["message"]["content"] == "Hello!"
    assert len(choice["logprobs"]["content"]) == 2
    assert choice["finish_reason"] == "length"


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("invalid_request", 400, "invalid_request_error"), ("prompt_too_long", 400,
                                                        "invalid_request_error"),
    ("model_not_found", 404, "invalid_request_error"), ("engine_error", 500, "server_error"),
])
def test_an_error_is_an_output_line_with_openais_error_object(code: str, status: int,
                                                              kind: str) -> None:
    message = wire.ErrorMessage("line-1", 0, code, "what went wrong", param="top_k")
    line = json.loads(OpenAIStream(reply(), 1).error(message))
    check_output_line(line)
    response = line["response"]
    assert response["status_code"] == status
    check_error_body(response["body"])
    assert response["body"]["error"] == {"message": "what went wrong", "type": kind,
                                         "param": "top_k", "code": code}
    assert wire.response_decoder.decode(json.dumps(line).encode()) == message


@pytest.mark.parametrize(("reason", "expect"), [
    ("expired", {"error": {"code": "batch_expired"}}),
    ("cancelled", {"error": {"code": "batch_cancelled"}}),
    ("rejected", {"response": {"status_code": 503}}),
])
def test_a_request_ended_unanswered_says_why_in_the_output_line(
        reason: str, expect: dict[str, Any]) -> None:
    final = wire.FinalMessage("line-1", 0, reason, wire.Usage(5, 0), TIMINGS,  # type: ignore[arg-type]
                              detail="overloaded" if reason == "rejected" else "")
    line = json.loads(OpenAIStream(reply(), 1).final(final))
    check_output_line(line)
    for key, fields in expect.items():
        for name, value in fields.items():
            assert line[key][name] == value
