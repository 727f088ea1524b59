"""JSON Schema documents of the OpenAI shapes, for ``topics/schema/``."""

from __future__ import annotations

from typing import Any

import msgspec

from streamproc.openai.protocol import ChatLine, CompletionsLine
from streamproc.openai.shapes import REPLY_TYPES


def json_schemas() -> dict[str, dict[str, Any]]:
    return {
        "openai_request": _one_of(
            [ChatLine, CompletionsLine],
            "An OpenAI Batch API input line on a request topic, keyed by custom_id"),
        "openai_response": _one_of(
            list(REPLY_TYPES),
            "A reply to an OpenAI Batch line: completion chunks, then the Batch output line; "
            "each also a native reply message (type, request_id, seq, attempt, ...)"),
    }


def _one_of(types: list[Any], title: str) -> dict[str, Any]:
    refs, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    return {"title": title, "oneOf": list(refs), "$defs": components}
