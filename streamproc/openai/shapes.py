"""OpenAI's reply shapes, each also a native reply message.

A reply to a job that came as a Batch line is one JSON object holding both: OpenAI's
fields (``chat.completion.chunk`` or ``text_completion``, then the Batch output line) and
the native message's (``type``, ``request_id``, ``seq``, ``attempt``, ...), side by side
at the top level. The names never collide, and each kind of reader ignores the other's
fields: code written for OpenAI reads the objects it knows, and the native reader rule
(docs/wire-schema.md) — with it takeovers, ``StreamprocClient`` and every tool that
follows a stream — works on these streams unchanged. Each class here subclasses the
native message it carries, so the native fields are declared once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from streamproc import wire


class TopLogprobEntry(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(msgspec.Struct, frozen=True):
    content: list[LogprobEntry]


class TextLogprobs(msgspec.Struct, frozen=True):
    """The completions endpoint's (legacy) log-probabilities."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionUsage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Delta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class TextChunkChoice(msgspec.Struct, frozen=True):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(wire.TokenChunk, frozen=True, kw_only=True):
    """A ``chat.completion.chunk``: its tokens as ``choices[0].delta.content``; the
    stream's last chunk has an empty delta and the ``finish_reason``, and with
    ``stream_options.include_usage`` one more follows with no choices and the ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class TextCompletionChunk(wire.TokenChunk, frozen=True, kw_only=True):
    """A streamed ``text_completion``: its tokens as ``choices[0].text``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: CompletionUsage | None = None


class AssistantMessage(msgspec.Struct, frozen=True):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class TextChoice(msgspec.Struct, frozen=True):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str


class ChatCompletion(msgspec.Struct, frozen=True, tag="chat.completion", tag_field="object"):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextCompletion(msgspec.Struct, frozen=True, tag="text_completion", tag_field="object"):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class CompletedResponse(msgspec.Struct, frozen=True):
    status_code: int
    request_id: str
    body: ChatCompletion | TextCompletion


class FailedResponse(msgspec.Struct, frozen=True):
    status_code: int
    request_id: str
    body: ErrorBody


class BatchError(msgspec.Struct, frozen=True):
    """The output line's ``error``: the request was not run to an answer (expired,
    cancelled)."""

    code: str
    message: str


class CompletedLine(wire.FinalMessage, frozen=True, kw_only=True):
    """A Batch output line answering with a completion (``finish_reason`` stop/length)."""

    id: str
    custom_id: str
    response: CompletedResponse
    error: None = None


class UnservedLine(wire.FinalMessage, frozen=True, kw_only=True):
    """A Batch output line for a request that ended unanswered: expired or cancelled
    (``error``), or shed by an overloaded worker (a 503 ``response``)."""

    id: str
    custom_id: str
    response: FailedResponse | None
    error: BatchError | None


class FailedLine(wire.ErrorMessage, frozen=True, kw_only=True):
    """A Batch output line for a request that failed: an error ``response`` in OpenAI's
    shape (400 for a request that cannot be served as asked, 404 for a model not served
    here, 500 for a failure of the worker's)."""

    id: str
    custom_id: str
    response: FailedResponse
    error: None = None


class OutputLine(msgspec.Struct, frozen=True):
    """The Batch API's output line, as ``streamproc batch`` writes it: the fields above
    without the native ones."""

    id: str
    custom_id: str
    response: msgspec.Raw
    """Kept as it came (``null`` included)."""
    error: BatchError | None


REPLY_TYPES = (ChatCompletionChunk, TextCompletionChunk, CompletedLine, UnservedLine,
               FailedLine)
output_line_decoder = msgspec.json.Decoder(OutputLine)
