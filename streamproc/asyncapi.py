"""The topics as an AsyncAPI 3 document, generated from the same structs as
``topics/schema/`` and the same declarations as ``streamproc topics apply``.

``streamproc schema`` writes it to ``topics/asyncapi.json``; a test fails when the file
differs from what this module generates, and validates it against the AsyncAPI
specification's own JSON Schema. The channels are the worker's view: it receives jobs and
cancellations, and sends chunks, dead letters and its status.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import msgspec

from streamproc import wire
from streamproc.openai import protocol, shapes
from streamproc.topics import Role, TopicSpec

_REF = "#/components/schemas/{name}"


class _Message(msgspec.Struct, frozen=True):
    name: str
    payload: Any
    summary: str
    key: str
    """What the record's key is."""


_MESSAGES: dict[Role, list[_Message]] = {
    "requests": [_Message("GenerationRequest", wire.GenerationRequest,
                          "A prompt job.", "the request id"),
                 _Message("ChatLine", protocol.ChatLine,
                          "An OpenAI Batch API line for /v1/chat/completions.",
                          "the custom_id"),
                 _Message("CompletionsLine", protocol.CompletionsLine,
                          "An OpenAI Batch API line for /v1/completions.", "the custom_id")],
    "responses": [
        _Message("TokenChunk", wire.TokenChunk,
                 "Newly generated tokens of one request, in seq order.", "the request id"),
        _Message("FinalMessage", wire.FinalMessage,
                 "The last message of a request that generated.", "the request id"),
        _Message("ErrorMessage", wire.ErrorMessage,
                 "The last message of a request that failed.", "the request id"),
        _Message("ChatCompletionChunk", shapes.ChatCompletionChunk,
                 "A chat.completion.chunk of a reply to an OpenAI Batch line (also a "
                 "native chunk).", "the custom_id"),
        _Message("TextCompletionChunk", shapes.TextCompletionChunk,
                 "A streamed text_completion of a reply to an OpenAI Batch line (also a "
                 "native chunk).", "the custom_id"),
        _Message("CompletedLine", shapes.CompletedLine,
                 "The Batch output line of an answered OpenAI line (also a native final).",
                 "the custom_id"),
        _Message("UnservedLine", shapes.UnservedLine,
                 "The Batch output line of an OpenAI line that expired, was cancelled or "
                 "shed (also a native final).", "the custom_id"),
        _Message("FailedLine", shapes.FailedLine,
                 "The Batch output line of an OpenAI line that failed (also a native "
                 "error).", "the custom_id")],
    "control": [_Message("CancelRequest", wire.CancelRequest,
                         "Stop a request at the next step.", "the request id")],
    "dead_letter": [_Message("DeadLetter", wire.DeadLetter,
                             "A record that could not be served, with the reason.",
                             "the original record's key")],
    "status": [_Message("WorkerStatus", wire.WorkerStatus,
                        "What a worker reports about itself (compacted).", "the worker id")],
    "attempts": [_Message("AttemptMark", wire.AttemptMark,
                          "How many times a worker died running a record (compacted; a "
                          "null value once the record is done).",
                          "topic/partition/offset of the request record")],
}
_WORKER_RECEIVES: frozenset[Role] = frozenset({"requests", "control"})
# The attempts topic is both: a worker reads it whole and writes it; described as sent.


def document(specs: list[TopicSpec]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``specs``' topics."""
    messages = {m.name: m for role in _MESSAGES for m in _MESSAGES[role]}
    _, schemas = msgspec.json.schema_components([m.payload for m in messages.values()],
                                                ref_template=_REF)
    channels, operations = {}, {}
    for spec in specs:
        channel_id = _identifier(spec.name)
        channels[channel_id] = _channel(spec)
        action = "receive" if spec.role in _WORKER_RECEIVES else "send"
        operations[f"{action}_{channel_id}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m.name}"}
                         for m in _MESSAGES[spec.role]],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "streamproc",
            "version": _version(),
            "description": "LLM generation over Kafka: prompt jobs in, streamed token chunks "
                           "out. Seen from a worker. JSON payloads; docs/wire-schema.md has "
                           "the rules a reader follows.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {name: _message(m) for name, m in messages.items()},
            "schemas": {name: _asyncapi_schema(s) for name, s in sorted(schemas.items())},
        },
    }


def _channel(spec: TopicSpec) -> dict[str, Any]:
    described = f"Role {spec.role}"
    if spec.lane:
        described += f", lane {spec.lane} (priority {spec.priority})"
    return {
        "address": spec.name,
        "description": f"{described}; {spec.partitions} partitions.",
        "messages": {m.name: {"$ref": f"#/components/messages/{m.name}"}
                     for m in _MESSAGES[spec.role]},
        "bindings": {"kafka": {"topic": spec.name, "partitions": spec.partitions,
                               "bindingVersion": "0.5.0"}},
    }


def _message(message: _Message) -> dict[str, Any]:
    return {
        "name": message.name,
        "summary": message.summary,
        "payload": {"$ref": _REF.format(name=message.name)},
        "bindings": {"kafka": {"key": {"type": "string", "description": message.key},
                               "bindingVersion": "0.5.0"}},
    }


def _asyncapi_schema(schema: Any) -> Any:
    """msgspec writes JSON Schema 2020-12 with OpenAPI's discriminator object; AsyncAPI's
    schema object takes the discriminating property's name."""
    if isinstance(schema, dict):
        out = {k: _asyncapi_schema(v) for k, v in schema.items()}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = out["discriminator"]["propertyName"]
        return out
    if isinstance(schema, list):
        return [_asyncapi_schema(v) for v in schema]
    return schema


def _identifier(topic: str) -> str:
    return topic.replace(".", "_").replace("-", "_")


def _version() -> str:
    try:
        return metadata.version("streamproc")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0.0.0"
