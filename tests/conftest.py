"""Shared fixtures: a real broker, a real (tiny) model, per-test topics and workers.

The broker is the one named by ``STREAMPROC_BOOTSTRAP``, or else a local Kafka
the suite provisions and starts for itself (and stops at the end).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from streamproc import logs, topics
from streamproc.config import TopicNames, WorkerConfig, bootstrap_from_env
from streamproc.devtools import localkafka
from streamproc.engine import catalog
from streamproc.engine.loader import LoadedModel, load_model
from streamproc.engine.tiny import make_tiny_model
from streamproc.worker.app import Worker

from . import processes


@pytest.fixture(autouse=True)
def no_worker_process_left() -> Iterator[None]:
    """Kill whatever worker process a test started and did not stop (it failed midway)."""
    yield
    while processes.RUNNING:
        processes.RUNNING.pop().kill()


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's logging as ``streamproc worker --log-format json`` sets it up; put
    back afterwards (pytest's own capture handlers, transformers' own handler)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_active", None)
    logs.setup("json")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    hf_logging.disable_propagation()
    hf_logging.enable_default_handler()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def loaded_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), "cpu")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real chat model's directory, from the cache the suite shares with the demo
    (fetched and converted on the first run on a machine, as the local broker is)."""
    return catalog.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: str) -> LoadedModel:
    return load_model(smollm2_dir, "cpu")


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = bootstrap_from_env()
    if external:
        yield external
        return
    state_dir = tmp_path_factory.mktemp("local-kafka")
    state = localkafka.start(state_dir, progress=lambda _: None)
    yield state.bootstrap
    localkafka.stop(state_dir)


@pytest.fixture
async def topic_names(bootstrap: str) -> TopicNames:
    """Fresh topics for each test, named after the declared ones."""
    suffix = uuid.uuid4().hex[:8]
    specs = topics.suffixed(topics.load_specs(), suffix, replication_factor=1)
    await topics.apply(bootstrap, specs)
    return topics.topic_names(specs)


@pytest.fixture
def worker_config(bootstrap: str, topic_names: TopicNames, tiny_model_dir: Path) -> WorkerConfig:
    return WorkerConfig(bootstrap=bootstrap, topics=topic_names, model=str(tiny_model_dir),
                        device="cpu", group_id=f"test-{uuid.uuid4().hex[:8]}",
                        commit_interval_s=0.2, batch_window_ms=5, status_interval_s=0.3,
                        lag_interval_s=0.5)


@pytest.fixture
async def worker(worker_config: WorkerConfig, loaded_model: LoadedModel) -> AsyncIterator[Worker]:
    running = Worker(worker_config, loaded_model)
    await running.start()
    yield running
    await running.stop()
