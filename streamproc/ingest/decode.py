"""Bytes from Kafka to a typed request, or the reason they are not one."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from streamproc import wire


@dataclass(frozen=True)
class Undecodable:
    """Why a record goes to the dead-letter topic."""

    reason: str
    detail: str
    envelope: wire.RequestEnvelope | None = None
    """Who to tell, when the broken request still names itself."""


def decode_request(value: bytes | None, max_bytes: int) -> wire.GenerationRequest | Undecodable:
    """The request, or why not; never raises, whatever the bytes (one record must not stop
    the worker that reads it, nor every worker that reads it after)."""
    if not value:
        return Undecodable("empty", "the record has no value")
    if len(value) > max_bytes:
        return Undecodable("too_large", f"{len(value)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return wire.request_decoder.decode(value)
    except msgspec.ValidationError as exc:
        return Undecodable("invalid_schema", str(exc), _envelope(value))
    except msgspec.DecodeError as exc:
        return Undecodable("malformed_json", str(exc))
    except RecursionError:  # msgspec recurses per nesting level; a few kB can nest too deep
        return Undecodable("too_deep", "the JSON nests deeper than the decoder follows")
    except Exception as exc:  # anything else about these bytes alone
        return Undecodable("undecodable", f"{type(exc).__name__}: {exc}")


def envelope_of(value: bytes | None) -> wire.RequestEnvelope | None:
    """Who a record says it is, if it says so; never raises."""
    return _envelope(value) if value else None


def _envelope(value: bytes) -> wire.RequestEnvelope | None:
    try:
        return wire.envelope_decoder.decode(value)
    except Exception:  # skipping a deep unknown value recurses too
        return None
