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
    """As any Kafka client would: JSON text keyed by custom_id."""
    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        for line in lines:
            await producer.send(topic, json.dumps(line).encode(),
                                key=line["custom_id"].encode())
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


async def test_a_raw_producer_and_consumer_speak_openai_through_kafka(
        smollm2_config: WorkerConfig, smollm2: LoadedModel) -> None:
    """Chunks whose deltas join to the output line's content, which is generate()'s; a
    completions line answered with text_completion objects; usage when asked for."""
    config = smollm2_config
    lines = [chat_line(f"chat-{i}", q) for i, q in enumerate(QUESTIONS[:3])]
    lines[0]["body"]["stream_options"] = {"include_usage": True}
    lines.append({"custom_id": "text-0", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt":
                           "The capital of France is", "max_tokens": 6, "temperature": 0}})
    worker = Worker(config, smollm2)
    await worker.start()
    try:
        await raw_publish(config.bootstrap, config.topics.requests[0], lines)
        # chat-0: chunks, a finish chunk, a usage chunk, the line; the others one fewer.
        values = await read_answers(config.bootstrap, config.topics.responses, len(lines))
    finally:
        await worker.stop()
    replies = by_custom_id(values)
    assert set(replies) == {line["custom_id"] for line in lines}
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


async def test_what_cannot_be_served_is_refused_by_name_on_both_schemas(
        smollm2_config: WorkerConfig, smollm2: LoadedModel) -> None:
    config = smollm2_config
    openai_lines = [chat_line("tools", "x", tools=[]), chat_line("n", "x", n=3),
                    chat_line("model", "x", model="gpt-4o"),
                    chat_line("topk", "x", top_k=-1)]
    native: list[dict[str, Any]] = [
        {"request_id": "native-knob", "prompt": "x", "params": {"top_kk": 5}},
        {"request_id": "native-model", "prompt": "x", "model": "gpt-4o"},
        {"request_id": "native-penalty", "prompt": "x", "params": {"presence_penalty": 9}}]
    worker = Worker(config, smollm2)
    await worker.start()
    try:
        producer = kafka.producer(config.bootstrap)
        await producer.start()
        for message in [*openai_lines, *native]:
            key = str(message.get("custom_id") or message["request_id"])
            await producer.send(config.topics.requests[0], json.dumps(message).encode(),
                                key=key.encode())
        await producer.stop()
        values = await read_answers(config.bootstrap, config.topics.responses, 7)
    finally:
        await worker.stop()
    replies = {key: messages[-1] for key, messages in by_custom_id(values).items()}
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
    lines = [chat_line(f"q{i}", q) for i, q in enumerate(QUESTIONS)]
    lines.append(chat_line("bad", "x", logit_bias={"1": 1}))  # one goes to the errors file
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output, errors = tmp_path / "jobs.output.jsonl", tmp_path / "jobs.errors.jsonl"
    args = [str(source), "--bootstrap", config.bootstrap, "--lane",
            config.topics.requests[0], "--reply-topic", config.topics.responses,
            "--max-in-flight", "2"]
    worker = Worker(config, smollm2)
    await worker.start()
    try:
        code, said = await run_batch(args, kill_after_lines=3, output=output)
        assert code == -signal.SIGKILL, said
        halfway = lines_in(output)
        assert 3 <= halfway < len(QUESTIONS)
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
    code, said = await run_batch(args)  # nothing left: nothing sent, the same verdict
    assert code == 1
    assert "(0 this run" in said


async def test_streamproc_batch_refuses_a_broken_file_before_sending_anything(
        tmp_path: Path, bootstrap: str) -> None:
    source = tmp_path / "broken.jsonl"
    good = json.dumps(chat_line("a", "x"))
    for content, says in [(f"{good}\n{{not json\n", "broken.jsonl:2"),
                          (f"{good}\n{good}\n", "'a' is the custom_id of more than one line"),
                          ('{"method": "POST"}\n', "broken.jsonl:1")]:
        source.write_text(content)
        code, said = await run_batch([str(source), "--bootstrap", bootstrap])
        assert code == 2, said
        assert says in said
        assert not (tmp_path / "broken.output.jsonl").exists()
