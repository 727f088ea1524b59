from dataclasses import fields
from pathlib import Path

import pytest

from streamproc.config import TopicNames, WorkerConfig, bootstrap_from_env
from streamproc.errors import ConfigError


def test_environment_then_overrides() -> None:
    env = {"STREAMPROC_MAX_BATCH_SIZE": "8", "STREAMPROC_BATCH_WINDOW_MS": "2.5",
           "STREAMPROC_MODEL": "from-env"}
    config = WorkerConfig.from_env(env, model="from-flag", max_inflight=None)
    assert config.max_batch_size == 8
    assert config.batch_window_ms == 2.5
    assert config.model == "from-flag"
    assert config.max_inflight == WorkerConfig().max_inflight


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="STREAMPROC_MAX_BATCH_SIZE"):
        WorkerConfig.from_env({"STREAMPROC_MAX_BATCH_SIZE": "lots"})


def test_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match="max_inflight"):
        WorkerConfig(max_batch_size=64, max_inflight=16)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        WorkerConfig(max_batch_tokens=0)
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        WorkerConfig(prefill_chunk_tokens=-1)
    with pytest.raises(ConfigError, match="close_timeout_s"):
        WorkerConfig(close_timeout_s=-1)
    with pytest.raises(ConfigError, match="attempts topic is required"):
        WorkerConfig(topics=TopicNames(attempts=""))
    assert WorkerConfig.from_env({"STREAMPROC_CLOSE_TIMEOUT_S": "2.5"}).close_timeout_s == 2.5


def test_bootstrap_from_env_ignores_blank() -> None:
    assert bootstrap_from_env({"STREAMPROC_BOOTSTRAP": "  "}) is None
    assert bootstrap_from_env({"STREAMPROC_BOOTSTRAP": "h:1"}) == "h:1"


def test_the_configuration_reference_is_current_and_documents_every_setting() -> None:
    from streamproc.cli.config_cmd import field_docs, reference
    from streamproc.cli.main import build_parser

    root = Path(__file__).resolve().parent.parent
    on_disk = (root / "docs" / "configuration.md").read_text()
    assert on_disk == reference(build_parser()), \
        "docs/configuration.md is stale: run make schema"
    documented = field_docs(WorkerConfig)
    undocumented = [f.name for f in fields(WorkerConfig)
                    if f.name not in ("topics", "security") and not documented.get(f.name)]
    assert not undocumented
    assert "`--max-batch-size`" in on_disk
    assert "`STREAMPROC_MAX_INFLIGHT`" in on_disk
