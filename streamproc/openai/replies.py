"""A stream's messages in OpenAI's shapes (:mod:`streamproc.openai.shapes`).

One :class:`OpenAIStream` per stream of a job that came as a Batch line: it renders each
native message the publisher makes, and keeps the completion's text and log-probabilities
so that the last message, the Batch output line, holds the whole answer as OpenAI's
``chat.completion`` (or ``text_completion``) body. A stream taken over from another
attempt starts from what that attempt published.
"""

from __future__ import annotations

import hashlib

import msgspec

from streamproc import wire
from streamproc.openai import shapes

ANSWERED = ("stop", "length")
"""Finish reasons of a completion; the others end a request unanswered."""
_STATUS = {"model_not_found": 404, "engine_error": 500, "poison": 500, "publish_failed": 500}
"""HTTP status of an error code in the output line; any other code is the request's
fault: 400."""
_UNANSWERED = {"expired": ("batch_expired", "the request's deadline passed before it was "
                           "answered"),
               "cancelled": ("batch_cancelled", "the request was cancelled")}
_encoder = msgspec.json.Encoder()


class OpenAIStream:
    def __init__(self, reply: wire.OpenAIReply, created: int,
                 resumed_text: str = "", resumed_logprobs: list[wire.TokenLogprob] | None = None,
                 first_seq: int = 0) -> None:
        self._reply = reply
        self._chat = reply.endpoint == "chat.completions"
        self._created = created
        digest = hashlib.sha256(reply.custom_id.encode()).hexdigest()[:24]
        self._id = f"{'chatcmpl' if self._chat else 'cmpl'}-{digest}"
        self._line_id, self._request_id = f"batch_req_{digest}", f"req_{digest}"
        self._text = [resumed_text] if resumed_text else []
        self._logprobs: list[wire.TokenLogprob] = list(resumed_logprobs or [])
        self._wants_logprobs = False
        self._role_sent = first_seq > 0

    @property
    def include_usage(self) -> bool:
        """Whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self._reply.include_usage

    def chunk(self, chunk: wire.TokenChunk) -> bytes:
        """A chunk of generated text."""
        self._text.append(chunk.text)
        logprobs = chunk.logprobs if isinstance(chunk.logprobs, list) else None
        if logprobs is not None:
            self._wants_logprobs = True
            self._logprobs += logprobs
        return self._chunk(chunk, chunk.text, logprobs, None)

    def finish_chunk(self, chunk: wire.TokenChunk, finish_reason: str) -> bytes:
        """The stream's last chunk: no text, the finish reason (``chunk`` has no tokens)."""
        return self._chunk(chunk, "", None, finish_reason)

    def usage_chunk(self, chunk: wire.TokenChunk, usage: wire.Usage) -> bytes:
        """``stream_options.include_usage``: no choices, the whole completion's usage."""
        native = msgspec.structs.asdict(chunk)
        cls = shapes.ChatCompletionChunk if self._chat else shapes.TextCompletionChunk
        return _encoder.encode(cls(**native, id=self._id, created=self._created,
                                   model=self._reply.model, choices=[], usage=_usage(usage)))

    def final(self, final: wire.FinalMessage) -> bytes:
        """The Batch output line that ends the stream."""
        native = msgspec.structs.asdict(final)
        if final.finish_reason in ANSWERED:
            response = shapes.CompletedResponse(200, self._request_id, self._body(final))
            return _encoder.encode(shapes.CompletedLine(
                **native, id=self._line_id, custom_id=self._reply.custom_id,
                response=response))
        if final.finish_reason in _UNANSWERED:
            code, message = _UNANSWERED[final.finish_reason]
            return _encoder.encode(shapes.UnservedLine(
                **native, id=self._line_id, custom_id=self._reply.custom_id, response=None,
                error=shapes.BatchError(code, message)))
        shed = self._failed(503, "server_error", final.detail or final.finish_reason,
                            f"the request was {final.finish_reason}: {final.detail}", None)
        return _encoder.encode(shapes.UnservedLine(
            **native, id=self._line_id, custom_id=self._reply.custom_id, response=shed,
            error=None))

    def error(self, error: wire.ErrorMessage) -> bytes:
        """The Batch output line of a failed request."""
        status = _STATUS.get(error.code, 400)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        response = self._failed(status, kind, error.code, error.message,
                                self._body_field(error.param))
        return _encoder.encode(shapes.FailedLine(
            **msgspec.structs.asdict(error), id=self._line_id,
            custom_id=self._reply.custom_id, response=response))

    def _chunk(self, chunk: wire.TokenChunk, text: str,
               logprobs: list[wire.TokenLogprob] | None, finish_reason: str | None) -> bytes:
        native = msgspec.structs.asdict(chunk)
        if self._chat:
            role = None if self._role_sent else "assistant"
            self._role_sent = True
            choice = shapes.ChunkChoice(0, shapes.Delta(role, text if text or role else None),
                                        _chat_logprobs(logprobs), finish_reason)
            return _encoder.encode(shapes.ChatCompletionChunk(
                **native, id=self._id, created=self._created, model=self._reply.model,
                choices=[choice]))
        text_choice = shapes.TextChunkChoice(
            0, text, _text_logprobs(logprobs, chunk.text_offset), finish_reason)
        return _encoder.encode(shapes.TextCompletionChunk(
            **native, id=self._id, created=self._created, model=self._reply.model,
            choices=[text_choice]))

    def _body(self, final: wire.FinalMessage) -> shapes.ChatCompletion | shapes.TextCompletion:
        text = "".join(self._text)
        logprobs = self._logprobs if self._wants_logprobs else None
        if self._chat:
            choice = shapes.ChatChoice(0, shapes.AssistantMessage("assistant", text),
                                       _chat_logprobs(logprobs), final.finish_reason)
            return shapes.ChatCompletion(self._id, self._created, self._reply.model, [choice],
                                         _usage(final.usage))
        text_choice = shapes.TextChoice(0, text, _text_logprobs(logprobs, 0),
                                        final.finish_reason)
        return shapes.TextCompletion(self._id, self._created, self._reply.model,
                                     [text_choice], _usage(final.usage))

    def _body_field(self, param: str) -> str | None:
        """The body's name for a request field the worker refused."""
        field = param.removeprefix("params.")
        if field == "prompt" and self._chat:
            return "messages"
        return {"max_new_tokens": "max_tokens"}.get(field, field) or None

    def _failed(self, status: int, kind: str, code: str, message: str,
                param: str | None) -> shapes.FailedResponse:
        detail = shapes.ErrorDetail(message, kind, param, code)
        return shapes.FailedResponse(status, self._request_id, shapes.ErrorBody(detail))


def _usage(usage: wire.Usage) -> shapes.CompletionUsage:
    return shapes.CompletionUsage(usage.prompt_tokens, usage.completion_tokens,
                                  usage.prompt_tokens + usage.completion_tokens)


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def _chat_logprobs(logprobs: list[wire.TokenLogprob] | None) -> shapes.ChatLogprobs | None:
    if logprobs is None:
        return None
    return shapes.ChatLogprobs([
        shapes.LogprobEntry(p.token, p.logprob, _utf8(p.token),
                            [shapes.TopLogprobEntry(t.token, t.logprob, _utf8(t.token))
                             for t in p.top])
        for p in logprobs])


def _text_logprobs(logprobs: list[wire.TokenLogprob] | None,
                   text_offset: int) -> shapes.TextLogprobs | None:
    if logprobs is None:
        return None
    offsets, at = [], text_offset
    for p in logprobs:
        offsets.append(at)
        at += len(p.token)
    return shapes.TextLogprobs([p.token for p in logprobs], [p.logprob for p in logprobs],
                               [{t.token: t.logprob for t in p.top} for p in logprobs],
                               offsets)
