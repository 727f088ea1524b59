"""10,000 generated hostile messages: each lands in the dead-letter topic or gets an
answer on its reply topic, and the worker serves the next valid request normally."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc import kafka, topics, wire
from streamproc.config import TopicNames, WorkerConfig

from . import processes
from .processes import WorkerProcess, write_topics_file

pytestmark = [
    pytest.mark.kafka, pytest.mark.model,
    # Falsifying examples hold 60 kB prompts; printing them is the point of a failure.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
    # The Kafka clients run on their own thread and use `random` (broker choice) while
    # Hypothesis generates data here; Hypothesis takes that for use inside a strategy.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]
T = TypeVar("T")
CASES_PER_EXAMPLE = 25
EXAMPLES = 400
MAX_MESSAGE_BYTES = 65_536
NEW_TOKENS_CAP = 4
UNIQUE = "<unique>"
_ids = itertools.count()
handled = {"cases": 0}

bad_ids = st.one_of(st.just(""), st.integers(), st.none(), st.just("x" * 300), st.just(UNIQUE))
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=4), st.none())
prompts = st.one_of(
    st.text(max_size=48), st.just(""), st.just("kafka " * 9_000),  # huge: too many tokens
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 3]),
                                    "content": st.text(max_size=16)}), max_size=3),
    st.lists(st.integers(), max_size=3), numbers)
params = st.one_of(numbers, st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.one_of(st.integers(-5, 2 * NEW_TOKENS_CAP), numbers),
    "temperature": numbers, "top_p": numbers,
    "stop": st.one_of(st.lists(st.text(max_size=3), max_size=20), numbers),
    "seed": numbers,
    "surprise": st.text(max_size=8),
}))
reply_topics = st.sampled_from(["", "__consumer_offsets", "nope", "streamproc.dead-letter"])
requests = st.fixed_dictionaries({"request_id": bad_ids, "prompt": prompts}, optional={
    "params": params, "priority": numbers, "deadline": numbers,
    "reply_topic": reply_topics,
    "unknown_field": st.recursive(st.none() | st.integers(), lambda c: st.lists(c, max_size=2)),
})
contents = st.one_of(st.text(max_size=16), numbers, st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", 7])},
    optional={"text": st.one_of(st.text(max_size=8), numbers)}), max_size=2))
bodies = st.one_of(numbers, st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["tiny-model0", "gpt-4o", ""]), numbers),
    "messages": st.one_of(numbers, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "tool", 3])},
        optional={"content": contents, "name": st.text(max_size=3)}), max_size=3)),
    "prompt": prompts,
    "max_tokens": numbers, "max_completion_tokens": numbers, "temperature": numbers,
    "top_p": numbers, "top_k": numbers, "n": numbers, "seed": numbers,
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20),
                      numbers),
    "frequency_penalty": numbers, "presence_penalty": numbers, "repetition_penalty": numbers,
    "logprobs": st.one_of(st.booleans(), numbers), "top_logprobs": numbers,
    "stream": st.one_of(st.booleans(), numbers),
    "stream_options": st.one_of(numbers, st.fixed_dictionaries(
        {}, optional={"include_usage": st.one_of(st.booleans(), numbers)})),
    "tools": st.lists(st.none(), max_size=1), "response_format": numbers,
}))
lines = st.fixed_dictionaries({"custom_id": bad_ids}, optional={
    "method": st.sampled_from(["POST", "GET", 1]),
    "url": st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", 5]),
    "body": bodies,
    "streamproc": st.one_of(numbers, st.fixed_dictionaries({}, optional={
        "priority": numbers, "deadline": numbers, "reply_topic": reply_topics,
        "colour": numbers})),
})
hostile = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.just(b""),
    requests,
    requests.map(lambda r: {**r, "prompt": "y" * (MAX_MESSAGE_BYTES + 100)}),  # too large
    lines,  # OpenAI Batch lines, every field of them hostile
)


def encode_case(case: bytes | dict[str, Any]) -> bytes:
    if isinstance(case, bytes):
        return case
    for id_field in ("request_id", "custom_id"):
        if case.get(id_field) == UNIQUE:
            case = {**case, id_field: f"hostile-{next(_ids)}-{uuid.uuid4().hex[:6]}"}
    return json.dumps(case, allow_nan=True).encode()  # NaN/Infinity: invalid JSON on purpose


def answered_by_id(payload: bytes) -> str | None:
    """The request id the worker should answer, or None when only a dead letter is due."""
    if len(payload) > MAX_MESSAGE_BYTES:
        return None
    try:
        decoded = msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(decoded, dict):
        return None
    for id_field in ("request_id", "custom_id"):  # a native job's, or an OpenAI line's
        rid = decoded.get(id_field)
        if isinstance(rid, str) and 1 <= len(rid) <= 256:
            return rid
    return None


class Harness:
    """Clients on a loop of their own, so a synchronous hypothesis test can drive them."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.answers: dict[str, wire.ResponseMessage] = {}
        self.letters: list[bytes] = []
        self.letter_records: list[bytes] = []
        self.call(self._start())

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _start(self) -> None:
        self.producer: AIOKafkaProducer = kafka.producer(self.config.bootstrap)
        await self.producer.start()
        self.readers: list[AIOKafkaConsumer] = []
        for topic in (self.config.topics.responses, self.config.topics.dead_letter):
            reader = kafka.consumer(self.config.bootstrap, group_id=None)
            await reader.start()
            partitions = await self.producer.partitions_for(topic)
            reader.assign([TopicPartition(topic, p) for p in partitions])
            self.readers.append(reader)

    async def run(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            await self.producer.send(self.config.topics.requests[0], payload,
                                     key=uuid.uuid4().bytes)
        await self.producer.flush()
        due_ids = {rid for p in payloads if (rid := answered_by_id(p))}
        due_letters = [p for p in payloads if not answered_by_id(p)]
        deadline = time.monotonic() + 60
        while not (due_ids <= self.answers.keys()
                   and all(p in self.letters for p in due_letters)):
            assert time.monotonic() < deadline, (
                "unanswered: ids " + repr(sorted(due_ids - self.answers.keys()))
                + ", letters " + repr([p[:80] for p in due_letters if p not in self.letters]))
            await self._read()

    async def _read(self) -> None:
        responses, dead = self.readers
        for records in (await responses.getmany(timeout_ms=100)).values():
            for record in records:
                message = wire.response_decoder.decode(record.value)
                if wire.is_terminal(message):
                    assert message.request_id not in self.answers, "answered twice"
                    self.answers[message.request_id] = message
        for records in (await dead.getmany(timeout_ms=10)).values():
            self.letters += [wire.dead_letter_decoder.decode(r.value).original for r in records]
            self.letter_records += [r.value for r in records]

    def stop(self) -> None:
        async def close() -> None:
            await self.producer.stop()
            for reader in self.readers:
                await reader.stop()
        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def harness(bootstrap: str, tiny_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    suffix = uuid.uuid4().hex[:8]
    specs = topics.suffixed(topics.load_specs(), suffix)
    names: TopicNames = topics.topic_names(specs)
    asyncio.run(topics.apply(bootstrap, specs))
    config = WorkerConfig(bootstrap=bootstrap, topics=names, model=str(tiny_model_dir),
                          group_id=f"hostile-{suffix}")
    folder = tmp_path_factory.mktemp("hostile")
    worker = WorkerProcess(config, write_topics_file(folder / "topics", names),
                           folder / "worker.log", "--max-new-tokens-cap", str(NEW_TOKENS_CAP),
                           env={"STREAMPROC_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)})
    running = Harness(config)
    running.call(worker.start())
    # The module's tests share this worker: the per-test cleanup must not kill it.
    processes.RUNNING.remove(worker)
    try:
        yield running
        assert worker.process is not None
        assert worker.process.returncode is None, "the worker died"
        running.call(worker.terminate())
    finally:
        worker.kill()
        running.stop()
    assert handled["cases"] >= 10_000


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(cases=st.lists(hostile, min_size=CASES_PER_EXAMPLE, max_size=CASES_PER_EXAMPLE))
def test_hostile_messages_are_dead_lettered_or_answered(
        harness: Harness, cases: list[bytes | dict[str, Any]]) -> None:
    payloads = [encode_case(c) for c in cases]
    sentinel = wire.GenerationRequest(request_id=f"sentinel-{uuid.uuid4().hex}",
                                      prompt="still serving?",
                                      params=wire.GenerationParams(max_new_tokens=2))
    harness.call(harness.run([*payloads, wire.encode(sentinel)]))
    answer = harness.answers[sentinel.request_id]
    assert isinstance(answer, wire.FinalMessage)
    assert answer.usage.completion_tokens >= 1
    for payload in payloads:
        rid = answered_by_id(payload)
        if rid is not None:
            reply = harness.answers[rid]
            assert isinstance(reply, wire.FinalMessage | wire.ErrorMessage)
            if isinstance(reply, wire.ErrorMessage):
                assert reply.code
    handled["cases"] += len(payloads)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def named_poison() -> list[bytes]:
    """Shapes a generator does not reach: JSON nested 3,000 deep (about 6 kB) in every
    field, at the top and as a chat message's content; lone surrogates; NUL bytes; numbers
    past a float's range; a chat of 1,500 messages."""
    rid = f"poison-{uuid.uuid4().hex[:6]}"
    deep = nested(3000)
    fields = [f'{{"request_id":"{rid}-p","prompt":{deep}}}',
              f'{{"request_id":{deep},"prompt":"hi"}}',
              f'{{"request_id":"{rid}-params","prompt":"hi","params":{deep}}}',
              f'{{"request_id":"{rid}-stop","prompt":"hi","params":{{"stop":{deep}}}}}',
              f'{{"request_id":"{rid}-extra","prompt":"hi","extra":{deep}}}',
              f'{{"request_id":"{rid}-chat","prompt":[{{"role":"user","content":{deep}}}]}}',
              deep, "{" + '"a":{' * 2000 + "}" * 2001]
    odd = [f'{{"request_id":"{rid}-sur","prompt":"a\\ud800b"}}',
           f'{{"request_id":"{rid}\\udfff","prompt":"hi"}}',
           f'{{"request_id":"{rid}-nul","prompt":"a\\u0000b\\u0000"}}',
           f'{{"request_id":"{rid}-big","prompt":"hi","params":{{"temperature":1e999}}}}',
           f'{{"request_id":"{rid}-int","prompt":"hi","params":{{"max_new_tokens":1e400}}}}',
           f'{{"request_id":"{rid}-neg","prompt":"hi","deadline":-1e999,"priority":1e999}}']
    chat = json.dumps({"request_id": f"{rid}-long-chat",
                       "prompt": [{"role": "user", "content": "hi"}] * 1500})
    return [text.encode() for text in [*fields, *odd, chat]]


def test_named_poison_is_dead_lettered_or_answered_and_the_worker_goes_on(
        harness: Harness) -> None:
    payloads = named_poison()
    assert all(len(p) < MAX_MESSAGE_BYTES for p in payloads)
    sentinel = wire.GenerationRequest(request_id=f"sentinel-{uuid.uuid4().hex}",
                                      prompt="still serving?",
                                      params=wire.GenerationParams(max_new_tokens=2))
    # run() waits for a dead letter of each payload that names no decodable id, and an
    # answer to each that does; the worker's survival is checked as the module ends.
    harness.call(harness.run([*payloads, wire.encode(sentinel)]))
    assert isinstance(harness.answers[sentinel.request_id], wire.FinalMessage)
    reasons = {wire.dead_letter_decoder.decode(r).reason for r in harness.letter_records
               if wire.dead_letter_decoder.decode(r).original in payloads}
    assert "too_deep" in reasons
