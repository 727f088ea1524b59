"""OpenAI's shapes through a real broker and a real model: Batch lines in from a raw
producer or ``streamproc batch``, completion chunks and output lines back."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from streamproc import kafka
from streamproc.config import WorkerConfig
from streamproc.engine.loader import LoadedModel
from streamproc.worker.app import Worker

from .helpers import read_topic, reference_tokens
from .openai_shapes import check_chat_chunk, check_output_line, check_text_chunk

pytestmark = pytest.mark.model

QUESTIONS = ["Name three colors.", "What is the capital of France?", "What is 12 times 12?",
             "Write a haiku about a queue.", "Say hello in Spanish.", "What is a byte?",
             "Name a large animal.", "What color is the sky?", "Count to five.",
             "What is Kafka?"]
MAX_TOKENS = 10


def chat_line(custom_id: str, question: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2-135m-instruct", "temperature": 0,
                     "max_completion_tokens": MAX_TOKENS,
                     "messages": [{"role": "user", "content": question}], **body}}


def expected_answer(model: LoadedModel, question: str, max_tokens: int = MAX_TOKENS) -> str:
    """generate(), greedy, on the model's own chat template."""
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
    text: str = model.tokenizer.decode(reference_tokens(model, ids, max_tokens),
                                       skip_special_tokens=True)
    return text


@pytest.fixture
def smollm2_config(worker_config: WorkerConfig, smollm2_dir: str) -> WorkerConfig:
    return replace(worker_config, model=smollm2_dir, engine_process=False,
                   model_aliases=("smollm2-135m-instruct",))


async def raw_publish(bootstrap: str, topic: str, lines: list[dict[str, Any]]) -> None:
    """As any Kafka client would: JSON text keyed by custom_id (or request_id)."""
    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        for line in lines:
            key = str(line.get("custom_id") or line["request_id"])
            await producer.send(topic, json.dumps(line).encode(), key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def read_answers(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Every value in ``topic`` from the start, until ``count`` streams have ended."""
    values: list[bytes] = []
    for _ in range(120):
        values = await read_topic(bootstrap, topic, timeout_s=1.0)
        ended = [v for v in values if json.loads(v).get("type") in ("final", "error")]
        if len(ended) >= count:
            return values
    raise AssertionError(f"{count} answers did not come")


def by_custom_id(values: list[bytes]) -> dict[str, list[dict[str, Any]]]:
    messages: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for value in values:
        message = json.loads(value)
        messages[message.get("custom_id") or message["request_id"]].append(message)
    return messages


REFUSED_LINES = [chat_line("tools", "x", tools=[]), chat_line("n", "x", n=3),
                 chat_line("model", "x", model="gpt-4o"), chat_line("topk", "x", top_k=-1)]
REFUSED_NATIVE: list[dict[str, Any]] = [
    {"request_id": "native-knob", "prompt": "x", "params": {"top_kk": 5}},
    {"request_id": "native-model", "prompt": "x", "model": "gpt-4o"},
    {"request_id": "native-penalty", "prompt": "x", "params": {"presence_penalty": 9}}]


async def test_a_raw_producer_and_consumer_speak_openai_and_refusals_name_the_field(
        smollm2_config: WorkerConfig, smollm2: LoadedModel) -> None:
    """Chunks whose deltas join to the output line's content, which is generate()'s; a
    completions line answered with text_completion objects; usage when asked for. Beside
    them, what cannot be served is refused by name, on both schemas."""
    config = smollm2_config
    lines = [chat_line(f"chat-{i}", q) for i, q in enumerate(QUESTIONS[:3])]
    lines[0]["body"]["stream_options"] = {"include_usage": True}
    lines.append({"custom_id": "text-0", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt":
                           "The capital of France is", "max_tokens": 6, "temperature": 0}})
    worker = Worker(config, smollm2)
    await worker.start()
    try:
        await raw_publish(config.bootstrap, config.topics.requests[0],
                          [*lines, *REFUSED_LINES, *REFUSED_NATIVE])
        values = await read_answers(config.bootstrap, config.topics.responses,
                                    len(lines) + len(REFUSED_LINES) + len(REFUSED_NATIVE))
    finally:
        await worker.stop()
    replies = by_custom_id(values)
    for i, question in enumerate(QUESTIONS[:3]):
        *chunks, last = replies[f"chat-{i}"]
        for chunk in chunks:
            check_chat_chunk(chunk)
        check_output_line(last)
        content = "".join(c["choices"][0]["delta"].get("content", "")
                          for c in chunks if c["choices"])
        body = last["response"]["body"]
        assert content == body["choices"][0]["message"]["content"] == expected_answer(
            smollm2, question)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert (chunks[-1].get("usage") is not None) == (i == 0)
        assert body["model"] == "smollm2-135m-instruct"
    *chunks, last = replies["text-0"]
    for chunk in chunks:
        check_text_chunk(chunk)
    check_output_line(last)
    text = last["response"]["body"]["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert "Paris" in text
    assert_refused_by_name({key: messages[-1] for key, messages in replies.items()})


def assert_refused_by_name(replies: dict[str, dict[str, Any]]) -> None:
    expected = {"tools": ("invalid_request", "tools", 400), "n": ("invalid_request", "n", 400),
                "model": ("model_not_found", "model", 404),
                "topk": ("invalid_params", "top_k", 400)}
    for custom_id, (code, param, status) in expected.items():
        line = replies[custom_id]
        check_output_line(line)
        assert line["response"]["status_code"] == status
        error = line["response"]["body"]["error"]
        assert (error["code"], error["param"]) == (code, param), custom_id
    for request_id, (code, param) in {
            "native-knob": ("invalid_request", "params.top_kk"),
            "native-model": ("model_not_found", "model"),
            "native-penalty": ("invalid_params", "params.presence_penalty")}.items():
        assert replies[request_id]["type"] == "error"
        assert (replies[request_id]["code"], replies[request_id]["param"]) == (code, param)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def run_batch(args: list[str], *, kill_after_lines: int = 0,
                    output: Path | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamproc", "batch", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if kill_after_lines and output is not None:
        while process.returncode is None:
            if await asyncio.to_thread(lines_in, output) >= kill_after_lines:
                process.send_signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.05)
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def test_streamproc_batch_answers_every_line_once_across_a_kill_and_a_rerun(
        smollm2_config: WorkerConfig, smollm2: LoadedModel, tmp_path: Path) -> None:
    config = smollm2_config
    source = tmp_path / "jobs.jsonl"
    lines = [chat_line(f"q{i}", q) for i, q in enumerate(QUESTIONS[:8])]
    lines.append(chat_line("bad", "x", logit_bias={"1": 1}))  # one goes to the errors file
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output, errors = tmp_path / "jobs.output.jsonl", tmp_path / "jobs.errors.jsonl"
    args = [str(source), "--bootstrap", config.bootstrap, "--lane",
            config.topics.requests[0], "--reply-topic", config.topics.responses,
            "--max-in-flight", "3"]
    worker = Worker(config, smollm2)
    await worker.start()
    try:
        code, said = await run_batch(args, kill_after_lines=3, output=output)
        assert code == -signal.SIGKILL, said
        halfway = lines_in(output)
        assert 3 <= halfway < len(lines) - 1
        code, said = await run_batch(args)
    finally:
        await worker.stop()
    assert code == 1, said  # every line answered, one of them with an error
    assert f"{len(lines)}/{len(lines)} answered" in said
    answered = [json.loads(line) for line in output.read_text().splitlines()]
    failed = [json.loads(line) for line in errors.read_text().splitlines()]
    ids = [line["custom_id"] for line in answered + failed]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each once
    for line in answered + failed:
        check_output_line(line)
        assert set(line) == {"id", "custom_id", "response", "error"}
    assert [f["custom_id"] for f in failed] == ["bad"]
    assert failed[0]["response"]["body"]["error"]["param"] == "logit_bias"
    for line in answered:
        question = QUESTIONS[int(line["custom_id"][1:])]
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        assert content == expected_answer(smollm2, question), question
    assert not (tmp_path / "jobs.output.jsonl.progress").exists()


async def test_streamproc_batch_refuses_a_broken_file_before_sending_anything(
        tmp_path: Path, bootstrap: str) -> None:
    """Exit 2 and one line naming the fault (every kind of fault: tests/test_batch_file.py)."""
    source = tmp_path / "broken.jsonl"
    good = json.dumps(chat_line("a", "x"))
    source.write_text(f"{good}\n{good}\n")
    code, said = await run_batch([str(source), "--bootstrap", bootstrap])
    assert code == 2, said
    assert "'a' is the custom_id of more than one line" in said
    assert not (tmp_path / "broken.output.jsonl").exists()
