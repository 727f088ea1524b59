"""An OpenAI Batch API input line, read as a streamproc job.

A line is ``{"custom_id", "method": "POST", "url", "body"}``: ``url`` is
``/v1/chat/completions`` or ``/v1/completions`` and ``body`` is that endpoint's request.
streamproc's own fields (priority, deadline, reply topic) ride beside them in a
``streamproc`` member, so the body stays exactly what OpenAI takes. ``custom_id`` is the
request id: the record's key, and every reply's.

Every body field is either served or refused by name: a parameter no worker honours
gives ``invalid_request`` with ``param`` naming it, never output that ignored it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from streamproc import wire
from streamproc.errors import RequestError

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
ENDPOINTS: dict[str, Literal["chat.completions", "completions"]] = {
    CHAT_URL: "chat.completions", COMPLETIONS_URL: "completions"}
ROLES = frozenset({"system", "developer", "user", "assistant"})
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
"""The legacy completions endpoint's ``logprobs`` is a count, at most 5."""
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""What OpenAI's completions endpoint generates when ``max_tokens`` is not given."""
OPENAI_TEMPERATURE = 1.0
"""OpenAI's default temperature: a body without one samples, as it would there."""
ANY_LENGTH = 0
"""``max_new_tokens`` of a chat job that names no limit: up to the worker's cap."""


class Extension(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``streamproc`` member of a line: what OpenAI's format has no place for."""

    priority: int = 0
    deadline: float | None = None
    """Unix seconds; past it the request ends ``expired``."""
    reply_topic: str = ""
    submitted_at: float | None = None


class BatchLine(msgspec.Struct, frozen=True):
    custom_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    method: str
    url: str
    body: msgspec.Raw
    streamproc: Extension | None = None


class LineEnvelope(msgspec.Struct, frozen=True):
    """Enough of a line to answer it, whatever else is wrong with it: a line that names
    itself is answered, however broken the rest."""

    custom_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    url: Any = ""
    streamproc: Any = None


class TextPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: str
    text: str = ""


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool | None = None
    """Accepted either way: the reply topic always streams."""
    stream_options: StreamOptions | None = None
    user: str | None = None
    """An end-user id for the caller's records; no effect on generation."""
    ignore_eos: bool | None = None


class ChatBody(_Sampling, frozen=True, forbid_unknown_fields=True):
    messages: list[Message] = msgspec.field(default_factory=list)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(_Sampling, frozen=True, forbid_unknown_fields=True):
    prompt: str | list[str] = ""
    logprobs: int | None = None
    echo: bool | None = None


class ChatLine(msgspec.Struct, frozen=True):
    """A chat-completions line as the JSON Schema describes it (decoding reads the body
    apart, to name what it refuses)."""

    custom_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: ChatBody
    streamproc: Extension | None = None


class CompletionsLine(msgspec.Struct, frozen=True):
    """A completions line as the JSON Schema describes it."""

    custom_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    method: Literal["POST"]
    url: Literal["/v1/completions"]
    body: CompletionBody
    streamproc: Extension | None = None


line_decoder = msgspec.json.Decoder(BatchLine)
line_envelope_decoder = msgspec.json.Decoder(LineEnvelope)
_chat_decoder = msgspec.json.Decoder(ChatBody)
_completion_decoder = msgspec.json.Decoder(CompletionBody)


def is_batch_line(value: bytes) -> bool:
    """Whether a record that is not a native job looks like a Batch line (names a
    ``custom_id``): then its errors take OpenAI's shape."""
    return b'"custom_id"' in value


def envelope(line: LineEnvelope | BatchLine) -> wire.RequestEnvelope:
    ext = line.streamproc
    reply_topic = (ext.reply_topic if isinstance(ext, Extension)
                   else ext.get("reply_topic") if isinstance(ext, dict) else "")
    if not isinstance(reply_topic, str):
        reply_topic = ""
    endpoint = ENDPOINTS.get(line.url, "chat.completions") if isinstance(line.url, str) \
        else "chat.completions"
    return wire.RequestEnvelope(line.custom_id, reply_topic,
                                wire.OpenAIReply(endpoint, line.custom_id, ""))


def to_request(line: BatchLine) -> wire.GenerationRequest:
    """The job a line asks for; raises :class:`RequestError` (``invalid_request``, with
    ``param``) for what cannot be served as asked."""
    if line.method.upper() != "POST":
        raise _invalid("method", f"method must be POST, got {line.method!r}")
    endpoint = ENDPOINTS.get(line.url)
    if endpoint is None:
        raise _invalid("url", f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {line.url!r}")
    body = _decode_body(line.body, endpoint)
    ext = line.streamproc or Extension()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    if isinstance(body, ChatBody):
        prompt: str | list[wire.ChatMessage] = _chat_messages(body.messages)
        params = _chat_params(body)
    else:
        prompt = _completion_prompt(body)
        params = _completion_params(body)
    return wire.GenerationRequest(
        request_id=line.custom_id, prompt=prompt, params=params, priority=ext.priority,
        deadline=ext.deadline, reply_topic=ext.reply_topic, submitted_at=ext.submitted_at,
        model=body.model,
        openai=wire.OpenAIReply(endpoint, line.custom_id, body.model, include_usage))


def _decode_body(raw: msgspec.Raw, endpoint: str) -> ChatBody | CompletionBody:
    decoder = _chat_decoder if endpoint == "chat.completions" else _completion_decoder
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(param_of(str(exc), prefix="$"), _unsupported(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise _invalid("body", f"body is not JSON: {exc}") from None


def param_of(message: str, prefix: str = "$") -> str:
    """The field a msgspec validation message is about, as a dotted path below
    ``prefix`` (``params.top_k``, ``messages[0].content``); empty if it names none."""
    at = re.search(r"at `(\$[^`]*)`", message)
    path = at.group(1) if at else "$"
    unknown = re.search(r"unknown field `([^`]*)`", message)
    if unknown:
        path = f"{path}.{unknown.group(1)}"
    missing = re.search(r"missing required field `([^`]*)`", message)
    if missing:
        path = f"{path}.{missing.group(1)}"
    return path.removeprefix(prefix).removeprefix(".")


def _unsupported(message: str) -> str:
    unknown = re.search(r"unknown field `([^`]*)`", message)
    if unknown:
        return f"{unknown.group(1)!r} is not supported here ({message})"
    return message


def _chat_messages(messages: list[Message]) -> list[wire.ChatMessage]:
    if not messages:
        raise _invalid("messages", "messages must hold at least one message")
    turns = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise _invalid(f"messages[{i}].role", f"role must be one of {sorted(ROLES)}, got "
                           f"{message.role!r}")
        turns.append(wire.ChatMessage(message.role, _text(message.content, i)))
    return turns


def _text(content: str | list[TextPart] | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type != "text":
            raise _invalid(f"messages[{i}].content[{j}].type",
                           f"content part type must be 'text' (only text is supported), "
                           f"got {part.type!r}")
    return "".join(part.text for part in content)


def _completion_prompt(body: CompletionBody) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise _invalid("prompt", "prompt must be one string (a list of several is "
                           "several requests: give each its own line)")
        prompt = prompt[0]
    if body.echo:
        raise _invalid("echo", "echo is not supported")
    return prompt


def _chat_params(body: ChatBody) -> wire.GenerationParams:
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise _invalid("max_completion_tokens", "give max_completion_tokens or max_tokens, "
                       "not both")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    top_logprobs = body.top_logprobs or 0
    if top_logprobs and not body.logprobs:
        raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise _invalid("top_logprobs", f"top_logprobs must be between 0 and "
                       f"{MAX_TOP_LOGPROBS}, got {top_logprobs}")
    return _params(body, ANY_LENGTH if limit is None else _positive("max_tokens", limit),
                   bool(body.logprobs), top_logprobs)


def _completion_params(body: CompletionBody) -> wire.GenerationParams:
    limit = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None \
        else _positive("max_tokens", body.max_tokens)
    count = body.logprobs
    if count is not None and not 0 <= count <= MAX_COMPLETION_LOGPROBS:
        raise _invalid("logprobs", f"logprobs must be between 0 and "
                       f"{MAX_COMPLETION_LOGPROBS}, got {count}")
    return _params(body, limit, count is not None, count or 0)


def _params(body: ChatBody | CompletionBody, limit: int, logprobs: bool,
            top_logprobs: int) -> wire.GenerationParams:
    if body.n is not None and body.n != 1:
        raise _invalid("n", f"n must be 1 (one choice per line), got {body.n}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return wire.GenerationParams(
        max_new_tokens=limit,
        temperature=OPENAI_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop, seed=body.seed, ignore_eos=bool(body.ignore_eos),
        top_k=body.top_k or 0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=logprobs, top_logprobs=top_logprobs)


def _positive(param: str, value: int) -> int:
    if value < 1:
        raise _invalid(param, f"{param} must be >= 1, got {value}")
    return value


def _invalid(param: str, message: str) -> RequestError:
    return RequestError("invalid_request", message, param=param)
