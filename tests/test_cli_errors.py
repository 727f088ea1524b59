"""Every command fails the way a user can act on: one line naming the problem and the fix,
an exit code of its own, no traceback unless -v asks for it. Real processes, a real broker
(and an address where none listens)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamproc.cli.failures import Exit
from streamproc.config import TopicNames

from .helpers import run_cli

NOWHERE = "127.0.0.1:1"  # nothing listens on port 1
DECLARED = (Path(__file__).resolve().parent.parent / "topics" / "streamproc.toml").read_text()


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamproc: error: ")
    return lines[0]


@pytest.mark.parametrize("command", [
    ["submit", "hello"], ["topics", "apply"], ["lag", "--once"], ["cancel", "some-id"],
    ["worker", "--model", "tiny"]], ids=" ".join)
async def test_an_unreachable_broker_is_one_line_and_exit_3(command: list[str]) -> None:
    code, _, err = await run_cli(*command, "--bootstrap", NOWHERE)
    assert code == Exit.BROKER
    line = one_line(err)
    assert NOWHERE in line
    assert "streamproc local-kafka start" in line


async def test_verbose_adds_the_traceback() -> None:
    code, _, err = await run_cli("-v", "lag", "--once", "--bootstrap", NOWHERE)
    assert code == Exit.BROKER
    assert "Traceback" in err
    assert "KafkaConnectionError" in err


@pytest.mark.kafka
async def test_a_missing_topic_is_one_line_and_exit_4(bootstrap: str,
                                                      topic_names: TopicNames) -> None:
    missing = f"no-such-lane-{uuid.uuid4().hex[:6]}"
    code, _, err = await run_cli("submit", "hello", "--bootstrap", bootstrap,
                                 "--reply-topic", topic_names.responses,
                                 "--request-topic", missing, "--timeout", "60")
    assert code == Exit.TOPIC
    line = one_line(err)
    assert missing in line
    assert "streamproc topics apply" in line
    code, _, err = await run_cli("submit", "hello", "--bootstrap", bootstrap,
                                 "--reply-topic", missing)
    assert code == Exit.TOPIC
    assert missing in one_line(err)


@pytest.mark.kafka
async def test_a_worker_whose_topics_are_missing_says_so_before_loading_a_model(
        bootstrap: str, tmp_path: Path) -> None:
    lane = f"absent-{uuid.uuid4().hex[:6]}"
    (tmp_path / "t.toml").write_text(DECLARED.replace("streamproc.requests.high", lane))
    code, _, err = await run_cli("worker", "--bootstrap", bootstrap, "--topics-dir",
                                 str(tmp_path), "--model", "/no/such/model")
    assert code == Exit.TOPIC  # not MODEL: the broker side is checked first, in seconds
    assert lane in one_line(err)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.kafka
async def test_a_metrics_port_in_use_is_one_line_and_exit_6(
        bootstrap: str, topic_names: TopicNames, taken_port: int, tmp_path: Path) -> None:
    code, _, err = await run_cli("worker", "--bootstrap", bootstrap,
                                 "--metrics-port", str(taken_port), "--model", "tiny")
    assert code == Exit.PORT
    line = one_line(err)
    assert str(taken_port) in line
    assert "--metrics-port" in line


async def test_a_missing_model_is_one_line_and_exit_5(tmp_path: Path) -> None:
    code, _, err = await run_cli("model", "pull", str(tmp_path / "none.gguf"))
    assert code == Exit.MODEL
    assert "none.gguf" in one_line(err)


@pytest.mark.parametrize(("args", "names"), [
    (["worker", "--max-batch-size", "0"], "max_batch_size"),
    (["worker", "--itl-target-ms", "-1"], "itl_target_ms"),
    (["submit", "-f", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
], ids=["batch", "itl", "file"])
async def test_bad_values_are_one_line_and_exit_2(args: list[str], names: str) -> None:
    code, _, err = await run_cli(*args, "--bootstrap", NOWHERE)
    assert code == Exit.USAGE
    assert names in one_line(err)


async def test_argparse_type_errors_exit_2_too() -> None:
    code, _, err = await run_cli("worker", "--max-batch-size", "many")
    assert code == Exit.USAGE
    assert "invalid int value: 'many'" in err


async def test_submit_reads_piped_prompts_and_refuses_bytes_that_are_not_utf8() -> None:
    code, _, err = await run_cli("submit", "--bootstrap", NOWHERE, stdin=b"\xff\xfe oops\n")
    assert code == Exit.USAGE
    assert "not UTF-8" in one_line(err)
    # Piped prompts are read (the command goes on to the broker, which is not there).
    code, _, err = await run_cli("submit", "--json", "--bootstrap", NOWHERE,
                                 stdin=b"first\nsecond\n")
    assert code == Exit.BROKER
    code, _, err = await run_cli("submit", "--bootstrap", NOWHERE)
    assert code == Exit.USAGE
    assert "pipe prompts in" in err


async def test_a_local_broker_port_in_use_is_one_line_and_exit_6(taken_port: int,
                                                                  tmp_path: Path) -> None:
    code, _, err = await run_cli("local-kafka", "start", "--port", str(taken_port),
                                 "--state-dir", str(tmp_path))
    assert code == Exit.PORT
    assert f"127.0.0.1:{taken_port} is in use" in one_line(err)
