"""Secrets, limits and what a job can never make a worker do."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from aiokafka.errors import KafkaConnectionError
from safetensors.torch import load_file

from streamproc import topics
from streamproc.client import StreamprocClient
from streamproc.config import KafkaSecurity, TopicNames, WorkerConfig
from streamproc.devtools import localkafka
from streamproc.engine.loader import LoadedModel, load_model, load_tokenizer
from streamproc.errors import ConfigError, ModelError, RequestError
from streamproc.ingest.prepare import Preparer
from streamproc.wire import GenerationParams, GenerationRequest
from streamproc.worker.app import Worker

SECRET = "s3cr3t-passw0rd"


def test_sasl_password_from_a_file_reaches_the_client_but_never_a_repr(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    env = {"STREAMPROC_SECURITY_PROTOCOL": "sasl_plaintext",
           "STREAMPROC_SASL_MECHANISM": "SCRAM-SHA-512",
           "STREAMPROC_SASL_USERNAME": "alice",
           "STREAMPROC_SASL_PASSWORD_FILE": str(secret_file)}
    security = KafkaSecurity.from_env(env)
    options = security.client_options()
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == SECRET
    config = WorkerConfig.from_env({**env, "STREAMPROC_MODEL": "m"})
    assert SECRET not in repr(config)
    assert SECRET not in repr(security)


def test_tls_builds_an_ssl_context() -> None:
    options = KafkaSecurity(protocol="SSL").client_options()
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert "sasl_plain_password" not in options


@pytest.mark.parametrize(("env", "message"), [
    ({"STREAMPROC_SECURITY_PROTOCOL": "SASL_SSL"}, "STREAMPROC_SASL_USERNAME"),
    ({"STREAMPROC_SECURITY_PROTOCOL": "CARRIER_PIGEON"}, "security protocol"),
    ({"STREAMPROC_SASL_MECHANISM": "GSSAPI"}, "SASL mechanism"),
    ({"STREAMPROC_SSL_CAFILE": "/nonexistent/ca.pem"}, "ssl_cafile"),
    ({"STREAMPROC_SASL_PASSWORD_FILE": "/nonexistent/pw"}, "PASSWORD_FILE"),
])
def test_bad_security_settings_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KafkaSecurity.from_env(env)


def test_a_job_can_only_reply_where_allowed() -> None:
    names = TopicNames(allowed_reply_pattern=r"tenant-[a-z]+\.responses")
    assert names.reply_allowed("streamproc.responses")
    assert names.reply_allowed("tenant-acme.responses")
    for forbidden in ("__consumer_offsets", "__transaction_state", "streamproc.dead-letter",
                      "streamproc.status", "streamproc.requests.default", "tenant-acme.other",
                      "x.tenant-acme.responses"):
        assert not names.reply_allowed(forbidden), forbidden
    with pytest.raises(ConfigError, match="regular expression"):
        WorkerConfig(reply_topic_pattern="(")


@pytest.mark.model
def test_prompt_token_limit_is_enforced(tiny_model_dir: Path) -> None:
    preparer = Preparer(load_tokenizer(str(tiny_model_dir)), 1024, 64, TopicNames(),
                        max_prompt_tokens=10)
    short = GenerationRequest(request_id="a", prompt="hi", params=GenerationParams(4))
    assert preparer.prepare(short, 0.0).max_new_tokens == 4
    long = GenerationRequest(request_id="b", prompt="kafka " * 50, params=GenerationParams(4))
    with pytest.raises(RequestError) as caught:
        preparer.prepare(long, 0.0)
    assert caught.value.code == "prompt_too_long"


@pytest.mark.model
def test_pickled_weights_are_refused_unless_allowed(tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    os.remove(pickled / "model.safetensors")
    torch.save(weights, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pickle-based \(\.bin\).*--allow-unsafe-weights"):
        load_model(str(pickled), "cpu")
    assert load_model(str(pickled), "cpu", allow_unsafe_weights=True).max_context == 1024


def test_the_default_metrics_endpoint_is_loopback_only() -> None:
    assert WorkerConfig().metrics_address == "127.0.0.1"
    assert WorkerConfig().metrics_port == 0


@pytest.mark.kafka
@pytest.mark.model
async def test_worker_and_client_over_sasl_plain(tiny_model_dir: Path,
                                                 loaded_model: LoadedModel,
                                                 tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "sasl-broker"
    broker = await asyncio.to_thread(localkafka.start, state_dir, progress=lambda _: None,
                                     sasl_users={"alice": SECRET})
    try:
        alice = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "alice", SECRET)
        specs = [replace(s, partitions=1) for s in topics.load_specs()]
        await topics.apply(broker.sasl_bootstrap, specs, security=alice)
        names = topics.topic_names(specs)
        config = WorkerConfig(bootstrap=broker.sasl_bootstrap, topics=names,
                              model=str(tiny_model_dir), security=alice, group_id="sasl")
        worker = Worker(config, loaded_model)
        await worker.start()
        try:
            async with StreamprocClient(broker.sasl_bootstrap, request_topic=names.requests[0],
                                        reply_topic=names.responses, security=alice) as client:
                result = await asyncio.wait_for(client.generate(
                    "over sasl", params=GenerationParams(max_new_tokens=3)), 60)
            assert result.usage.completion_tokens == 3
        finally:
            await worker.stop()
        mallory = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "alice", "wrong")
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(topics.apply(broker.sasl_bootstrap, specs,
                                                security=mallory), 30)
        assert "SaslAuthenticationFailed" in caplog.text
    finally:
        await asyncio.to_thread(localkafka.stop, state_dir)
