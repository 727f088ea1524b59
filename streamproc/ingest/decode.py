"""Bytes from Kafka to a typed request, or the reason they are not one.

A record is a native job (:class:`~streamproc.wire.GenerationRequest`) or an OpenAI Batch
API input line (:mod:`streamproc.openai.protocol`), which becomes one.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from streamproc import wire
from streamproc.errors import RequestError
from streamproc.openai import protocol


@dataclass(frozen=True)
class Undecodable:
    """Why a record goes to the dead-letter topic."""

    reason: str
    detail: str
    envelope: wire.RequestEnvelope | None = None
    """Who to tell, when the broken request still names itself."""
    param: str = ""
    """The field at fault, where the schema says which."""


@dataclass(frozen=True)
class Refused:
    """A well-formed record asking for what cannot be served: answered, not dead-lettered."""

    envelope: wire.RequestEnvelope
    error: RequestError


def decode_request(value: bytes | None, max_bytes: int
                   ) -> wire.GenerationRequest | Undecodable | Refused:
    """The request, or why not; never raises, whatever the bytes (one record must not stop
    the worker that reads it, nor every worker that reads it after)."""
    if not value:
        return Undecodable("empty", "the record has no value")
    if len(value) > max_bytes:
        return Undecodable("too_large", f"{len(value)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return _decoded(value)
    except msgspec.ValidationError as exc:
        return Undecodable("invalid_schema", str(exc), _envelope(value),
                           protocol.param_of(str(exc)))
    except msgspec.DecodeError as exc:
        return Undecodable("malformed_json", str(exc))
    except RecursionError:  # msgspec recurses per nesting level; a few kB can nest too deep
        return Undecodable("too_deep", "the JSON nests deeper than the decoder follows")
    except Exception as exc:  # anything else about these bytes alone
        return Undecodable("undecodable", f"{type(exc).__name__}: {exc}")


def _decoded(value: bytes) -> wire.GenerationRequest | Refused:
    if not protocol.is_batch_line(value):
        return wire.request_decoder.decode(value)
    try:
        line = protocol.line_decoder.decode(value)
    except msgspec.ValidationError:
        try:  # a native job whose text happens to say "custom_id"
            return wire.request_decoder.decode(value)
        except msgspec.ValidationError:
            pass
        raise  # the line's own error: it names the line's fields
    try:
        return protocol.to_request(line)
    except RequestError as exc:
        return Refused(protocol.envelope(line), exc)


def envelope_of(value: bytes | None) -> wire.RequestEnvelope | None:
    """Who a record says it is, if it says so; never raises."""
    return _envelope(value) if value else None


def _envelope(value: bytes) -> wire.RequestEnvelope | None:
    try:
        return wire.envelope_decoder.decode(value)
    except Exception:  # skipping a deep unknown value recurses too
        pass
    if not protocol.is_batch_line(value):
        return None
    try:
        return protocol.envelope(protocol.line_envelope_decoder.decode(value))
    except Exception:
        return None
