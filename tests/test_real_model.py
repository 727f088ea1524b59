"""SmolLM2-135M-Instruct, a real chat model, through the engine and through Kafka."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from streamproc import wire
from streamproc.client import StreamprocClient
from streamproc.config import TopicNames, WorkerConfig
from streamproc.engine.detokenize import IncrementalDetokenizer
from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.sequence import PreparedRequest
from streamproc.ingest.prepare import Preparer
from streamproc.worker.app import Worker

from .helpers import eventually, reference_tokens

pytestmark = pytest.mark.model

QUESTIONS = ["Name three colors.", "What is the capital of France?",
             "Write a haiku about a message queue.", "What is 12 times 12?",
             "Écris une phrase sur le café.", "用中文写一句关于猫的话。"]


def chat(question: str) -> list[wire.ChatMessage]:
    return [wire.ChatMessage("system", "You are a concise assistant."),
            wire.ChatMessage("user", question)]


def chat_ids(model: LoadedModel, question: str) -> list[int]:
    """What the model's own chat template gives, tokenized by transformers."""
    turns = [{"role": m.role, "content": m.content} for m in chat(question)]
    ids: list[int] = model.tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
    return ids


def test_the_prompt_built_from_chat_messages_is_the_models_chat_template(
        smollm2: LoadedModel) -> None:
    preparer = Preparer(smollm2.tokenizer, smollm2.max_context, 64, TopicNames())
    for question in QUESTIONS:
        request = wire.GenerationRequest(request_id="q", prompt=chat(question))
        assert preparer.prepare(request, time.time()).prompt_ids == chat_ids(smollm2, question)


async def test_greedy_chat_answers_through_kafka_equal_generate(
        worker_config: WorkerConfig, smollm2_dir: str, smollm2: LoadedModel) -> None:
    """Whatever shares the batch: the answers arrive in two groups, the second joining a
    batch mid-decode; none carries the end-of-turn token."""
    config = replace(worker_config, model=smollm2_dir, engine_process=False)
    worker = Worker(config, smollm2)
    await worker.start()
    try:
        async with StreamprocClient(config.bootstrap, request_topic=config.topics.requests[0],
                                    reply_topic=config.topics.responses) as client:
            params = wire.GenerationParams(max_new_tokens=24)
            streams = [await client.submit(chat(q), params=params) for q in QUESTIONS[:3]]
            await eventually(lambda: worker.serving.running > 0)  # the first group decodes
            streams += [await client.submit(chat(q), params=params) for q in QUESTIONS[3:]]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)),
                                             180)
    finally:
        await worker.stop()
    tokenizer = smollm2.tokenizer
    for question, result in zip(QUESTIONS, results, strict=True):
        expected = reference_tokens(smollm2, chat_ids(smollm2, question), 24)
        assert result.token_ids == expected, question
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert "<|im_end|>" not in result.text
        assert result.usage.completion_tokens == len(expected)
        assert result.finish_reason == ("stop" if len(expected) < 24 else "length")
    assert "Paris" in results[1].text  # a real answer, not noise


def test_stop_strings_cut_real_text_before_the_stop(smollm2: LoadedModel) -> None:
    ids = chat_ids(smollm2, "Name three colors.")
    full = smollm2.tokenizer.decode(reference_tokens(smollm2, ids, 24),
                                    skip_special_tokens=True)
    # Greedy, so the answer is fixed: "The most obvious color is white, but there are
    # many more. Some examples include:\n\n- Red: ..."
    for stop in ("white", "many more", "\n"):
        assert stop in full, (stop, full)
        request = wire.GenerationRequest(
            request_id=stop, prompt="-", params=wire.GenerationParams(max_new_tokens=24,
                                                                      stop=[stop]))
        engine = Engine(smollm2)
        events = engine.step([PreparedRequest(request, ids, 24, time.time())])
        while not events[-1].outcome:
            events += engine.step([])
        assert "".join(e.text for e in events) == full[:full.index(stop)], stop
        assert events[-1].outcome.finish_reason == "stop"


@pytest.mark.parametrize("text", [
    "Café, naïve, crème brûlée — Ærøskøbing.",
    "日本語のテキストと中文字符，还有한국어。",  # noqa: RUF001
    "Emoji: 👩🏽‍💻🚀🔥 and flags 🇫🇷🇯🇵, then ASCII again.",
])
def test_incremental_deltas_join_to_the_full_decode_on_multilingual_text(
        smollm2: LoadedModel, text: str) -> None:
    tokenizer = smollm2.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prompt = tokenizer("Say:", add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)  # no half characters ever shown
