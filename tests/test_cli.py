"""The command line as a user meets it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamproc.cli import worker_cmd
from streamproc.cli.main import build_parser, main
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




def options_without_help(parser: argparse.ArgumentParser, command: str = "") -> list[str]:
    """Every argument of ``parser`` and its subcommands that --help would leave bare."""
    bare = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                bare += options_without_help(subparser, f"{command} {name}".strip())
        elif not action.help:
            bare.append(f"{command} {'/'.join(action.option_strings) or action.dest}")
    return bare


def test_every_option_says_what_it_does() -> None:
    assert options_without_help(build_parser()) == []

def test_worker_help_shows_the_config_defaults(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The defaults --help prints are read from the config, so they follow a change there."""
    changed = WorkerConfig(max_batch_size=77, prefill_chunk_tokens=333, window_max_ms=12.5)
    monkeypatch.setattr(worker_cmd, "_DEFAULTS", changed)
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "most sequences decoding together (77)" in shown
    assert "in between (333; 0: whole prompts)" in shown
    assert "adaptive: longest window (12.5)" in shown


NOT_CONFIG = {"bootstrap", "topics_dir", "log_format", "verbose", "handler", "command"}
"""Worker options that are not WorkerConfig fields (the bootstrap is passed on its own)."""


def test_every_worker_option_given_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STREAMPROC_"):
            monkeypatch.delenv(name)
    args = build_parser().parse_args([
        "worker", "--bootstrap", "broker:9092", "--model", "m", "--max-batch-size", "7",
        "--prefill-chunk-tokens", "64", "--chunk-rate", "5", "--close-timeout", "3",
        "--group", "g", "--allow-unsafe-weights", "--metrics-address", "0.0.0.0",
        "--engine-thread"])
    config = worker_cmd.config_from_args(args)
    assert (config.bootstrap, config.model, config.max_batch_size) == ("broker:9092", "m", 7)
    assert (config.prefill_chunk_tokens, config.chunk_rate, config.close_timeout_s) == (64, 5, 3)
    assert (config.group_id, config.allow_unsafe_weights) == ("g", True)
    assert config.metrics_address == "0.0.0.0"
    assert not config.engine_process
    assert config.max_inflight == WorkerConfig().max_inflight  # not given: the default
    config_fields = {f.name for f in dataclasses.fields(WorkerConfig)}
    assert set(vars(args)) - NOT_CONFIG <= config_fields  # no option is silently dropped

STUBBORN = """
import asyncio, sys
from streamproc.cli.main import raise_on_signals

async def stubborn():
    print("ready", flush=True)
    for _ in range(40):  # 2 s, unless interrupted
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # lost, as a wait_for racing its inner future's completion can lose it

if sys.argv[1] == "raise":
    with raise_on_signals():
        asyncio.run(stubborn())
else:
    asyncio.run(stubborn())
print("finished", flush=True)
"""


@pytest.mark.parametrize(("mode", "interrupted"), [("raise", True), ("asyncio", False)])
def test_ctrl_c_is_not_lost_to_a_task_that_swallows_its_cancellation(
        mode: str, interrupted: bool) -> None:
    """Under the command line's handlers Ctrl-C raises at once. Under asyncio.run's own it
    only cancels the main task, and one that swallows the cancellation runs on to the end:
    a `local-kafka start` carried on that way and left its broker running."""
    with subprocess.Popen([sys.executable, "-c", STUBBORN, mode], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)
        out = child.stdout.read()
        assert (child.wait(30) != 0) is interrupted
    assert ("finished" not in out) is interrupted


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
    code, _, err = await run_cli("submit", "penalized", "--max-new-tokens", "3",
                                 "--presence-penalty", "5", *topic_args(worker_config))
    assert code == 1
    assert "presence_penalty must be between -2 and 2" in err
    # Sampling among the one likeliest token is greedy decoding: the flag reaches the engine.
    greedy = await run_cli("submit", "same", "--max-new-tokens", "5", *topic_args(worker_config))
    top_1 = await run_cli("submit", "same", "--max-new-tokens", "5", "--temperature", "1.5",
                          "--top-k", "1", *topic_args(worker_config))
    assert greedy[0] == top_1[0] == 0
    assert greedy[1] == top_1[1]
    hot = await run_cli("submit", "same", "--max-new-tokens", "5", "--temperature", "1.5",
                        *topic_args(worker_config))
    assert hot[1] != greedy[1]  # without top-k the same temperature draws otherwise
