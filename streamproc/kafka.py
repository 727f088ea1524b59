"""Building aiokafka clients from one place, so every client is set up alike."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

CLIENT_ID = "streamproc"


def producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": CLIENT_ID,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(bootstrap: str, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": CLIENT_ID,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def admin(bootstrap: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=CLIENT_ID)
