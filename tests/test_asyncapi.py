"""topics/asyncapi.json: generated from the wire structs and the topic declarations,
current, a valid AsyncAPI 3.0 document, and a description real messages satisfy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from streamproc import asyncapi, topics, wire

ROOT = Path(__file__).resolve().parent.parent
# The AsyncAPI specification's JSON Schema for 3.0.0, as the npm package @asyncapi/specs
# (6.11.1, Apache-2.0) ships it with local references ("-without-$id").
SPEC_SCHEMA = Path(__file__).resolve().parent / "data" / "asyncapi-3.0.0.schema.json"


def on_disk() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "topics" / "asyncapi.json").read_text())
    return loaded


def test_the_asyncapi_document_is_current() -> None:
    generated = asyncapi.document(topics.load_specs(ROOT / "topics"))
    assert on_disk() == generated, "topics/asyncapi.json is stale: run make schema"


def test_it_is_valid_against_the_asyncapi_specification() -> None:
    spec = json.loads(SPEC_SCHEMA.read_text())
    jsonschema.Draft7Validator(spec).validate(on_disk())
    # ... and the validator would have said so if it were not.
    broken = {**on_disk(), "channels": {"x": {"address": 7}}}
    assert not jsonschema.Draft7Validator(spec).is_valid(broken)


def test_every_reference_resolves_and_every_topic_is_a_channel() -> None:
    document = on_disk()

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    for ref in refs(document):
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"unresolved {ref}"
            target = target[part]
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {s.name for s in topics.load_specs(ROOT / "topics")}


def payload_validator(document: dict[str, Any], message: str) -> jsonschema.Validator:
    schema = {**document["components"]["messages"][message]["payload"],
              "components": document["components"]}
    return jsonschema.Draft7Validator(schema)


def test_real_messages_satisfy_their_channels_payloads() -> None:
    document = on_disk()
    request = wire.GenerationRequest(
        request_id="r-1", prompt=[wire.ChatMessage("user", "hello")],
        params=wire.GenerationParams(max_new_tokens=8, stop=["\n"]), deadline=1.5e9)
    chunk = wire.TokenChunk("r-1", 0, "Hi", [42], attempt="a", offset=0)
    final = wire.FinalMessage("r-1", 1, "stop", wire.Usage(3, 1), wire.Timings(0.1, 0.2, 0.3))
    for name, message in (("GenerationRequest", request), ("TokenChunk", chunk),
                          ("FinalMessage", final)):
        payload = msgspec.json.decode(wire.encode(message))
        payload_validator(document, name).validate(payload)
    bad: dict[str, Any] = {"request_id": "", "prompt": 5}
    assert not payload_validator(document, "GenerationRequest").is_valid(bad)
