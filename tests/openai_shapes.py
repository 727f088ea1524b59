"""Checks of OpenAI's shapes, written from OpenAI's API reference (the Batch API's output
line, chat.completion, chat.completion.chunk, text_completion, the error object), not
from streamproc's own structs: each raises AssertionError naming what is off."""

from __future__ import annotations

from typing import Any

FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


def check_output_line(line: dict[str, Any]) -> None:
    """``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
    "error": {"code", "message"} | null}``."""
    _fields(line, {"id": str, "custom_id": str})
    assert "response" in line, "no response"
    assert "error" in line, "no error"
    response, error = line["response"], line["error"]
    assert response is not None or error is not None, "neither response nor error"
    if response is not None:
        _fields(response, {"status_code": int, "request_id": str, "body": dict})
        if response["status_code"] == 200:
            body = response["body"]
            (check_chat_completion if body.get("object") == "chat.completion"
             else check_text_completion)(body)
        else:
            check_error_body(response["body"])
    if error is not None:
        _fields(error, {"code": str, "message": str})


def check_chat_completion(body: dict[str, Any]) -> None:
    _header(body, "chat.completion")
    for i, choice in enumerate(body["choices"]):
        _fields(choice, {"index": int, "message": dict})
        assert choice["index"] == i
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str | None)
        assert choice["finish_reason"] in FINISH_REASONS
        _chat_logprobs(choice.get("logprobs"))
    check_usage(body["usage"])


def check_text_completion(body: dict[str, Any]) -> None:
    _header(body, "text_completion")
    for choice in body["choices"]:
        _fields(choice, {"index": int, "text": str})
        assert choice["finish_reason"] in FINISH_REASONS
        _text_logprobs(choice.get("logprobs"))
    check_usage(body["usage"])


def check_chat_chunk(chunk: dict[str, Any]) -> None:
    _header(chunk, "chat.completion.chunk")
    for choice in chunk["choices"]:
        _fields(choice, {"index": int, "delta": dict})
        delta = choice["delta"]
        assert set(delta) <= {"role", "content", "refusal", "tool_calls"}, delta
        assert isinstance(delta.get("content", ""), str | None)
        assert choice.get("finish_reason") in FINISH_REASONS | {None}
        _chat_logprobs(choice.get("logprobs"))
    if chunk.get("usage") is not None:
        assert chunk["choices"] == [], "a usage chunk has no choices"
        check_usage(chunk["usage"])


def check_text_chunk(chunk: dict[str, Any]) -> None:
    _header(chunk, "text_completion")
    for choice in chunk["choices"]:
        _fields(choice, {"index": int, "text": str})
        assert choice.get("finish_reason") in FINISH_REASONS | {None}
        _text_logprobs(choice.get("logprobs"))


def check_error_body(body: dict[str, Any]) -> None:
    _fields(body, {"error": dict})
    error = body["error"]
    _fields(error, {"message": str, "type": str})
    assert isinstance(error.get("param"), str | None)
    assert isinstance(error.get("code"), str | None)


def check_usage(usage: dict[str, Any]) -> None:
    _fields(usage, {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int})
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def _header(obj: dict[str, Any], kind: str) -> None:
    _fields(obj, {"id": str, "object": str, "created": int, "model": str, "choices": list})
    assert obj["object"] == kind, f"object {obj['object']!r}, not {kind!r}"


def _chat_logprobs(logprobs: dict[str, Any] | None) -> None:
    if logprobs is None:
        return
    for entry in logprobs["content"]:
        _fields(entry, {"token": str, "logprob": float, "top_logprobs": list})
        assert entry["logprob"] <= 0
        assert entry["bytes"] is None or bytes(entry["bytes"]).decode("utf-8", "replace")
        for top in entry["top_logprobs"]:
            _fields(top, {"token": str, "logprob": float})


def _text_logprobs(logprobs: dict[str, Any] | None) -> None:
    if logprobs is None:
        return
    _fields(logprobs, {"tokens": list, "token_logprobs": list, "top_logprobs": list,
                       "text_offset": list})
    assert len({len(logprobs[k]) for k in ("tokens", "token_logprobs", "text_offset")}) == 1


def _fields(obj: dict[str, Any], types: dict[str, type]) -> None:
    assert isinstance(obj, dict), f"not an object: {obj!r}"
    for name, kind in types.items():
        assert name in obj, f"no {name!r} in {sorted(obj)}"
        value = obj[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        assert ok or (kind is float and isinstance(value, int)), \
            f"{name!r} is {type(value).__name__}, not {kind.__name__}"
