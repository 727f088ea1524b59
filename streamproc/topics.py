"""Topics as code: the ``topics/*.toml`` declarations and applying them.

``apply`` is idempotent: it creates what is missing and reports drift (a
partition count or a config value that differs from the declaration) without
changing existing topics, since shrinking partitions or rewriting retention
under a live system is a decision for a person, not a tool.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streamproc import kafka
from streamproc.config import KafkaSecurity, TopicNames
from streamproc.errors import ConfigError

Role = Literal["requests", "responses", "dead_letter", "status", "control", "attempts"]
_ROLES = ("requests", "responses", "dead_letter", "status", "control", "attempts")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    role: Role
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)
    lane: str = ""
    priority: int = 0
    """Request lanes only: higher lanes are admitted first."""


@dataclass(frozen=True)
class ApplyReport:
    created: list[str]
    unchanged: list[str]
    drift: list[str]


def default_topics_dir() -> Path:
    """``topics/`` in the current directory (a deployment's own declarations), else the
    ones shipped inside the package (``streamproc/declarations``, a link to the
    repository's ``topics/`` in a source tree)."""
    here = Path("topics")
    return here if here.is_dir() else Path(__file__).resolve().parent / "declarations"


def load_specs(directory: Path | None = None) -> list[TopicSpec]:
    folder = directory or default_topics_dir()
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise ConfigError(f"no topic declarations (*.toml) in {folder}")
    return [spec for path in files for spec in _parse_file(path)]


def _parse_file(path: Path) -> list[TopicSpec]:
    data = tomllib.loads(path.read_text())
    default_rf = int(data.get("defaults", {}).get("replication_factor", 1))
    return [_parse_topic(path, entry, default_rf) for entry in data.get("topic", [])]


def _parse_topic(path: Path, entry: dict[str, Any], default_rf: int) -> TopicSpec:
    try:
        role = entry["role"]
        if role not in _ROLES:
            raise ConfigError(f"{path}: topic {entry.get('name')!r} has unknown role {role!r}")
        return TopicSpec(
            name=str(entry["name"]),
            role=role,
            partitions=int(entry["partitions"]),
            replication_factor=int(entry.get("replication_factor", default_rf)),
            config={str(k): str(v) for k, v in entry.get("config", {}).items()},
            lane=str(entry.get("lane", "")),
            priority=int(entry.get("priority", 0)),
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: a [[topic]] lacks {exc.args[0]!r}") from exc


def suffixed(specs: list[TopicSpec], suffix: str, **changes: Any) -> list[TopicSpec]:
    """The same declarations under names ending in ``.{suffix}`` (tests, benchmarks)."""
    return [replace(s, name=f"{s.name}.{suffix}", **changes) for s in specs]


def topic_names(specs: list[TopicSpec]) -> TopicNames:
    """The worker's topic names as the declarations give them."""
    def one(role: Role) -> str:
        names = [s.name for s in specs if s.role == role]
        if len(names) != 1:
            raise ConfigError(f"expected exactly one {role} topic, found {names}")
        return names[0]

    ranked = sorted((s for s in specs if s.role == "requests"), key=lambda s: -s.priority)
    lanes = tuple(s.name for s in ranked)
    if not lanes:
        raise ConfigError("no requests topic declared")
    return TopicNames(requests=lanes, responses=one("responses"), dead_letter=one("dead_letter"),
                      status=one("status"), control=one("control"),
                      attempts=one("attempts"))


async def apply(bootstrap: str, specs: list[TopicSpec], replication_factor: int | None = None,
                security: KafkaSecurity | None = None) -> ApplyReport:
    """Create missing topics; report, never change, those that differ."""
    client = kafka.admin(bootstrap, security)
    await client.start()
    try:
        existing = set(await client.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            await client.create_topics([_new_topic(s, replication_factor) for s in missing])
        present = [s for s in specs if s.name in existing]
        drift = await _drift(client, present) if present else []
    finally:
        await client.close()
    drifted = {line.split(":", 1)[0] for line in drift}
    unchanged = [s.name for s in present if s.name not in drifted]
    return ApplyReport([s.name for s in missing], unchanged, drift)


def _new_topic(spec: TopicSpec, replication_factor: int | None) -> NewTopic:
    return NewTopic(
        name=spec.name,
        num_partitions=spec.partitions,
        replication_factor=replication_factor or spec.replication_factor,
        topic_configs=spec.config,
    )


async def _drift(client: Any, specs: list[TopicSpec]) -> list[str]:
    described = {t["topic"]: t for t in await client.describe_topics([s.name for s in specs])}
    resources = [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs]
    actual = _configs_by_topic(await client.describe_configs(resources))
    lines = []
    for spec in specs:
        partitions = len(described[spec.name]["partitions"])
        if partitions != spec.partitions:
            lines.append(f"{spec.name}: {partitions} partitions, declared {spec.partitions}")
        for key, want in spec.config.items():
            have = actual.get(spec.name, {}).get(key)
            if have != want:
                lines.append(f"{spec.name}: {key}={have}, declared {want}")
    return lines


def _configs_by_topic(responses: list[Any]) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = resource[3], resource[4]
            result[name] = {entry[0]: entry[1] for entry in entries}
    return result
