"""The wire schema: every message streamproc reads or writes on Kafka.

JSON on the wire so that any Kafka client in any language can publish a job.
Evolution rules (also in docs/wire-schema.md):

* a new field always gets a default, so old messages still decode;
* unknown fields are ignored, so old workers accept newer producers -- except generation
  parameters: one a worker does not know is refused by name (``invalid_request``), never
  silently ignored, since output that ignored it would pass for what was asked;
* fields are never renamed, retyped or removed within a ``schema_version``;
* response messages are a tagged union on ``type``; a reader skips tags it does
  not know rather than failing.

One typed decoder per topic is built once here and reused (decoding into a
Struct validates while it parses; there is no second validation pass).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec

SCHEMA_VERSION = 1

FinishReason = Literal["stop", "length", "expired", "cancelled", "rejected"]


class ChatMessage(msgspec.Struct, frozen=True):
    """One turn of a chat prompt, rendered with the model's chat template."""

    role: str
    content: str


class GenerationParams(msgspec.Struct, frozen=True, omit_defaults=True,
                       forbid_unknown_fields=True):
    """How to generate. ``temperature`` 0 (or under 1e-5) means greedy decoding. The
    penalties apply before temperature, top-k and top-p, to greedy rows too."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = msgspec.field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    """Generate exactly ``max_new_tokens`` (benchmarks, fixed-length outputs)."""
    top_k: int = 0
    """Sample among the ``top_k`` likeliest tokens only; 0: all."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated so far (-2 to 2)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far (-2 to 2)."""
    repetition_penalty: float = 1.0
    """Divides positive and multiplies negative logits of every token in the prompt or
    generated so far (``transformers``' rule); 1: off."""
    logprobs: bool = False
    """Each chunk carries its tokens' log-probabilities under the model (``log_softmax`` of
    its logits, before any penalty, temperature or truncation)."""
    top_logprobs: int = 0
    """With ``logprobs``: also this many likeliest tokens at each position (0 to 20)."""


class GenerationRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A prompt job, published to a ``requests`` topic keyed by ``request_id``."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt: str | list[ChatMessage]
    params: GenerationParams = msgspec.field(default_factory=GenerationParams)
    priority: int = 0
    # Unix time in seconds after which the result is no longer wanted.
    deadline: float | None = None
    # Where chunks and the final message go; empty means the worker's default.
    reply_topic: str = ""
    # Unix time in seconds at which the producer submitted the job.
    submitted_at: float | None = None
    schema_version: int = SCHEMA_VERSION
    model: str = ""
    """A model name the worker serves (its model's name or an alias); empty: whichever
    model the group serves. Any other name is refused with ``model_not_found``."""
    openai: OpenAIReply | None = None
    """Set for a job that came as an OpenAI Batch line: its replies take OpenAI's shapes."""


class OpenAIReply(msgspec.Struct, frozen=True, omit_defaults=True):
    """How a job that came as an OpenAI Batch line is answered
    (:mod:`streamproc.openai`)."""

    endpoint: Literal["chat.completions", "completions"]
    custom_id: str
    model: str
    include_usage: bool = False
    """Its stream ends with a chunk of ``usage`` (``stream_options.include_usage``)."""


class RequestEnvelope(msgspec.Struct, frozen=True):
    """Just enough of a request to answer it when the rest fails validation."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    reply_topic: str = ""
    openai: OpenAIReply | None = None


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One of the likeliest tokens at a position: ``[token_id, token, logprob]``."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True):
    """A generated token's log-probability, and the likeliest tokens at its position."""

    token: str
    logprob: float
    top: list[TopLogprob] = msgspec.field(default_factory=list)


class TokenChunk(msgspec.Struct, frozen=True, tag="chunk", tag_field="type"):
    """One or more newly generated tokens of a request, in ``seq`` order."""

    request_id: str
    seq: int
    text: str
    token_ids: list[int]
    attempt: str = ""
    """Which processing of the request produced this (see :class:`Takeover`)."""
    offset: int = 0
    """Tokens of the stream before this chunk: where ``token_ids`` start."""
    text_offset: int = 0
    """Characters (Unicode code points) of the stream's text before this chunk."""
    logprobs: list[TokenLogprob] | msgspec.UnsetType = msgspec.UNSET
    """One per token of ``token_ids``, when the request asked for ``logprobs``."""


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int


class Timings(msgspec.Struct, frozen=True):
    """Seconds. ``queue_s`` runs from submit (or Kafka append) to prefill."""

    queue_s: float
    ttft_s: float
    total_s: float


class FinalMessage(msgspec.Struct, frozen=True, tag="final", tag_field="type"):
    """The last message of a successful stream; ``seq`` follows the last chunk."""

    request_id: str
    seq: int
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    detail: str = ""
    """Why, where ``finish_reason`` alone does not say (e.g. ``overloaded`` for rejected)."""
    attempt: str = ""


class ErrorMessage(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    """The last message of a failed stream: ``code`` is machine-readable."""

    request_id: str
    seq: int
    code: str
    message: str
    retriable: bool = False
    attempt: str = ""
    param: str = ""
    """The request field at fault, where one is (``params.top_k``, ``model``)."""


class Takeover(msgspec.Struct, frozen=True, tag="takeover", tag_field="type"):
    """A worker took the request over from an attempt that had started it: from this
    message on, readers follow ``attempt`` only. The new attempt continues the stream
    from exactly what the followed attempt published before this message (its chunks'
    ``seq`` and ``offset`` carry on); messages of any other attempt after it are
    ignored, whoever wrote them."""

    request_id: str
    attempt: str
    at: float = msgspec.field(default_factory=time.time)


ResponseMessage = TokenChunk | FinalMessage | ErrorMessage | Takeover


class CancelRequest(msgspec.Struct, frozen=True):
    """On the control topic, keyed by ``request_id``: stop that request at the next step."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    at: float = msgspec.field(default_factory=time.time)


class AttemptMark(msgspec.Struct, frozen=True):
    """On the attempts topic, keyed ``topic/partition/offset`` of a request record: that a
    worker started it (so its next owner takes it over rather than starting afresh) and
    how many times a worker was running it in the engine when it died. Removed (a
    tombstone) once the record's offset is committed; a worker reads the whole topic when
    it starts."""

    topic: str
    partition: int
    offset: int
    attempts: int
    at: float = msgspec.field(default_factory=time.time)
    since: float = 0.0
    """When a worker first started the record (Unix seconds): its stream on the reply
    topic begins after this, which is where a takeover starts reading."""


class WorkerStatus(msgspec.Struct, frozen=True):
    """What each worker reports about itself on the status topic, keyed by ``worker_id``."""

    worker_id: str
    group_id: str
    at: float
    tokens_per_s: float
    avg_tokens_per_request: float
    running: int
    waiting: int
    held_requests: int
    paused: bool


class DeadLetter(msgspec.Struct, frozen=True):
    """What the dead-letter topic holds: the original bytes and why they failed."""

    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    original: bytes
    key: bytes | None = None
    failed_at: float = msgspec.field(default_factory=time.time)


request_decoder = msgspec.json.Decoder(GenerationRequest)
envelope_decoder = msgspec.json.Decoder(RequestEnvelope)
response_decoder = msgspec.json.Decoder(ResponseMessage)
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
status_decoder = msgspec.json.Decoder(WorkerStatus)
cancel_decoder = msgspec.json.Decoder(CancelRequest)
attempt_decoder = msgspec.json.Decoder(AttemptMark)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Serialise any wire message to JSON bytes."""
    return _encoder.encode(message)


def is_terminal(message: ResponseMessage) -> bool:
    """Whether ``message`` ends its request's stream (of the attempt that wrote it)."""
    return isinstance(message, FinalMessage | ErrorMessage)


def json_schemas() -> dict[str, dict[str, object]]:
    """JSON Schema documents for each topic's payload, for ``topics/schema``."""
    return {
        "request": msgspec.json.schema(GenerationRequest),
        "response": msgspec.json.schema(ResponseMessage),
        "dead_letter": msgspec.json.schema(DeadLetter),
        "status": msgspec.json.schema(WorkerStatus),
        "cancel": msgspec.json.schema(CancelRequest),
        "attempt": msgspec.json.schema(AttemptMark),
    }
