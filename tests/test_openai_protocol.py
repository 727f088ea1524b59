"""OpenAI Batch lines read as jobs: what is served, and what is refused by name."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from streamproc import wire
from streamproc.errors import RequestError
from streamproc.ingest.decode import Refused, Undecodable, decode_request
from streamproc.openai import protocol

MAX_BYTES = 1_000_000


def line(body: dict[str, Any], *, url: str = protocol.CHAT_URL, custom_id: str = "c1",
         **extra: Any) -> bytes:
    return msgspec.json.encode({"custom_id": custom_id, "method": "POST", "url": url,
                                "body": body, **extra})


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}


def decoded(value: bytes) -> wire.GenerationRequest:
    request = decode_request(value, MAX_BYTES)
    assert isinstance(request, wire.GenerationRequest), request
    return request


def refusal(value: bytes) -> RequestError:
    request = decode_request(value, MAX_BYTES)
    assert isinstance(request, Refused), request
    return request.error


def test_a_chat_line_becomes_a_job_keyed_by_its_custom_id_with_every_parameter() -> None:
    request = decoded(line(chat(
        max_completion_tokens=7, temperature=0.5, top_p=0.9, top_k=40, stop="END", seed=3,
        frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.1, logprobs=True,
        top_logprobs=2, n=1, stream=True, stream_options={"include_usage": True}, user="u"),
        streamproc={"priority": 2, "deadline": 9e9, "reply_topic": "r"}))
    assert request.request_id == "c1"
    assert request.prompt == [wire.ChatMessage("user", "Hi")]
    assert request.params == wire.GenerationParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40, stop=["END"], seed=3,
        frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.1, logprobs=True,
        top_logprobs=2)
    assert (request.priority, request.deadline, request.reply_topic) == (2, 9e9, "r")
    assert request.model == "m"
    assert request.openai == wire.OpenAIReply("chat.completions", "c1", "m", True)


def test_defaults_are_openais_not_ours() -> None:
    """No temperature samples at 1, as OpenAI would; no limit on a chat runs to the
    worker's cap; the completions endpoint stops at 16 tokens."""
    request = decoded(line(chat()))
    assert request.params.temperature == 1.0
    assert request.params.max_new_tokens == protocol.ANY_LENGTH
    text = decoded(line({"model": "m", "prompt": "Once"}, url=protocol.COMPLETIONS_URL))
    assert text.prompt == "Once"
    assert text.params.max_new_tokens == 16
    assert text.openai is not None
    assert text.openai.endpoint == "completions"


def test_text_parts_join_and_the_completions_logprobs_count_becomes_top_logprobs() -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    request = decoded(line(chat(messages=[{"role": "system", "content": parts},
                                          {"role": "user", "content": "x"}])))
    assert request.prompt == [wire.ChatMessage("system", "Hello"), wire.ChatMessage("user", "x")]
    text = decoded(line({"model": "m", "prompt": ["Once"], "logprobs": 3, "max_tokens": 2},
                        url=protocol.COMPLETIONS_URL))
    assert (text.params.logprobs, text.params.top_logprobs, text.params.max_new_tokens) == (
        True, 3, 2)


@pytest.mark.parametrize(("body", "param"), [
    (chat(tools=[{"type": "function"}]), "tools"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    (chat(logit_bias={"1": 5}), "logit_bias"),
    (chat(n=2), "n"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=5, max_completion_tokens=5), "max_completion_tokens"),
    (chat(max_tokens="5"), "max_tokens"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(stream_options={"include_usage": True, "continuous_usage_stats": True}),
     "stream_options.continuous_usage_stats"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": "x", "name": "bob"}]), "messages[0].name"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].image_url"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_an_unsupported_or_malformed_chat_parameter_is_refused_by_name(
        body: dict[str, Any], param: str) -> None:
    error = refusal(line(body))
    assert error.code == "invalid_request"
    assert error.param == param
    assert param.split(".")[-1].split("[")[0] in error.message


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": [1, 2, 3]}, "prompt[0]"),
    ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
])
def test_an_unsupported_completions_parameter_is_refused_by_name(
        body: dict[str, Any], param: str) -> None:
    error = refusal(line(body, url=protocol.COMPLETIONS_URL))
    assert (error.code, error.param) == ("invalid_request", param)


@pytest.mark.parametrize(("fields", "param"), [
    ({"method": "GET"}, "method"), ({"url": "/v1/embeddings"}, "url"),
    ({"streamproc": {"priority": 1, "colour": "red"}}, "streamproc.colour"),
])
def test_a_line_for_another_endpoint_or_with_unknown_extensions_is_refused(
        fields: dict[str, Any], param: str) -> None:
    value = msgspec.json.encode({"custom_id": "c1", "method": "POST", "url": protocol.CHAT_URL,
                                 "body": chat(), **fields})
    request = decode_request(value, MAX_BYTES)
    if isinstance(request, Undecodable):  # the line's own schema: dead-lettered, answered
        assert request.param == param
        assert request.envelope is not None
        assert request.envelope.openai is not None
        return
    assert isinstance(request, Refused)
    assert request.error.param == param


def test_a_broken_line_still_names_itself_so_its_error_comes_in_openais_shape() -> None:
    for value in (b'{"custom_id": "c9", "method": "POST", "url": "/v1/completions"}',
                  b'{"custom_id": "c9", "method": "POST", "url": "/v1/completions", '
                  b'"body": 5}'):
        request = decode_request(value, MAX_BYTES)
        assert isinstance(request, Undecodable | Refused)
        assert request.envelope is not None
        assert request.envelope.request_id == "c9"
        assert request.envelope.openai is not None
        assert request.envelope.openai.endpoint == "completions"


def test_a_native_job_that_mentions_custom_id_is_still_a_native_job() -> None:
    native = wire.GenerationRequest(request_id="n", prompt='say "custom_id" twice')
    assert decoded(wire.encode(native)) == native


@pytest.mark.parametrize(("params", "param"), [
    ({"top_kk": 5}, "params.top_kk"), ({"max_tokens": 5}, "params.max_tokens"),
    ({"top_k": "x"}, "params.top_k"), ({"logprobs": 3}, "params.logprobs"),
])
def test_a_native_job_with_an_unknown_parameter_is_refused_by_name_not_ignored(
        params: dict[str, Any], param: str) -> None:
    value = msgspec.json.encode({"request_id": "n", "prompt": "x", "params": params})
    request = decode_request(value, MAX_BYTES)
    assert isinstance(request, Undecodable)
    assert request.param == param
    assert request.envelope is not None
    assert request.envelope.request_id == "n"


def test_every_hostile_shape_of_a_line_is_answered_or_dead_lettered_never_raised() -> None:
    deep = b'{"custom_id": "d", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for value in (deep, b'{"custom_id": 5}', b'{"custom_id": "x", "body": {"model": "m"}}',
                  b'{"custom_id": "c", "method": "POST", "url": "/v1/completions", '
                  b'"body": {"model": "m", "prompt": "\xff"}}',
                  b'\xff\xfe{"custom_id": "c"}', b'{"custom_id": ""}' + b" " * 10):
        result = decode_request(value, MAX_BYTES)
        assert isinstance(result, wire.GenerationRequest | Undecodable | Refused)
