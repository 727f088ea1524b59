"""The command line as a user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamproc.cli.main import main
from streamproc.config import WorkerConfig
from streamproc.worker.app import Worker

from .helpers import run_cli

COMMANDS = [["worker"], ["submit"], ["topics"], ["topics", "apply"], ["local-kafka"],
            ["make-tiny-model"], ["schema"], ["demo"], ["lag"], ["cancel"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert f"usage: streamproc {' '.join(command)}" in capsys.readouterr().out


def test_a_missing_broker_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("STREAMPROC_BOOTSTRAP", raising=False)
    assert main(["submit", "hello"]) == 2
    assert "STREAMPROC_BOOTSTRAP" in capsys.readouterr().err


def test_local_kafka_status_without_a_broker(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["local-kafka", "status", "--state-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == "not running"


def topic_args(config: WorkerConfig) -> list[str]:
    return ["--bootstrap", config.bootstrap, "--request-topic", config.topics.requests[0],
            "--reply-topic", config.topics.responses]


@pytest.mark.kafka
@pytest.mark.model
async def test_submit_many_prompts_prints_one_json_line_each(
        worker: Worker, worker_config: WorkerConfig) -> None:
    prompts = b"first prompt\n\nsecond prompt\nthird\n"
    code, out, err = await run_cli("submit", "--json", "-f", "-", "--max-new-tokens", "5",
                                   *topic_args(worker_config), stdin=prompts)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert set(line) == {"request_id", "text", "finish_reason", "usage", "timings"}
        assert line["usage"]["completion_tokens"] <= 5
        assert line["timings"]["total_s"] >= line["timings"]["ttft_s"]


@pytest.mark.kafka
@pytest.mark.model
async def test_submit_one_prompt_streams_text_and_reports_errors(
        worker: Worker, worker_config: WorkerConfig) -> None:
    code, _, err = await run_cli("submit", "stream me", "--max-new-tokens", "6",
                                   *topic_args(worker_config))
    assert code == 0, err
    assert "6 tokens" in err or "stop" in err
    code, _, err = await run_cli("submit", "bad", "--max-new-tokens", "0",
                                   *topic_args(worker_config))
    assert code == 1
    assert "invalid_params" in err
