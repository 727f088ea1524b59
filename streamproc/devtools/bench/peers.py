"""Baseline workers for the benchmark, speaking the same wire format as streamproc.

* naive: consume one request, ``model.generate()`` it, repeat;
* fixed window: gather up to ``batch_size`` requests for ``window_s``, run them as
  one static ``generate()`` batch (left-padded), repeat.

Both stream tokens as ``generate()`` produces them (a streamer publishes each
step), so their latencies compare with streamproc's on equal terms.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from transformers.generation.streamers import BaseStreamer

from streamproc import kafka, wire
from streamproc.config import TopicNames
from streamproc.engine.detokenize import IncrementalDetokenizer
from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.sequence import PreparedRequest
from streamproc.engine.threads import apply_serving_threads


class _StepStreamer(BaseStreamer):
    """Hands each step's new tokens (one per row) to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[list[int] | None]) -> None:
        self._loop = loop
        self._queue = queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt itself
            self._prompt_seen = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


BASELINE_LINGER_MS = 2


class GeneratePeer:
    def __init__(self, bootstrap: str, topics: TopicNames, loaded: LoadedModel, group: str,
                 *, batch_size: int, window_s: float, cpu_threads: int = 0) -> None:
        self._topics = topics
        self._cpu_threads = cpu_threads
        self._loaded = loaded
        self._batch_size = batch_size
        self._window_s = window_s
        self._consumer: AIOKafkaConsumer = kafka.consumer(bootstrap, *topics.requests,
                                                          group_id=group)
        # The linger every producer had before streamproc's default became none: the
        # baselines send a message per token per step, and that change is not theirs.
        self._producer: AIOKafkaProducer = kafka.producer(bootstrap, linger_ms=BASELINE_LINGER_MS)
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Under the worker's thread policy, as Worker.start applies it to itself, so no
        # peer loses to its own I/O competing with torch's kernel threads.
        apply_serving_threads(self._loaded.device, self._cpu_threads)
        await self._producer.start()
        await self._consumer.start()
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
        await self._producer.stop()
        self._executor.shutdown(wait=True)

    async def _serve(self) -> None:
        while True:
            batch = await self._gather()
            if batch:
                await self._generate(batch)
                await self._consumer.commit()

    async def _gather(self) -> list[wire.GenerationRequest]:
        records: list[Any] = []
        deadline: float | None = None
        while len(records) < self._batch_size:
            wait_ms = 200 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            fetched = await self._consumer.getmany(timeout_ms=wait_ms,
                                                   max_records=self._batch_size - len(records))
            records += [r for rs in fetched.values() for r in rs]
            if records and deadline is None:
                deadline = time.monotonic() + self._window_s
            if deadline is not None and time.monotonic() >= deadline:
                break
        return [wire.request_decoder.decode(r.value) for r in records]

    async def _generate(self, batch: list[wire.GenerationRequest]) -> None:
        tokenizer = self._loaded.tokenizer
        prompts = [tokenizer(r.prompt).input_ids for r in batch]
        ids, mask = _left_pad(prompts, self._loaded.pad_id)
        new = max(r.params.max_new_tokens for r in batch)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        started = time.time()
        run = loop.run_in_executor(self._executor, self._run_generate, ids, mask, new,
                                   _StepStreamer(loop, queue))
        await self._publish_steps(batch, prompts, queue, started)
        await run

    def _run_generate(self, ids: torch.Tensor, mask: torch.Tensor, new: int,
                      streamer: BaseStreamer) -> Any:
        with torch.inference_mode():
            return self._loaded.model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=self._loaded.pad_id, streamer=streamer)

    async def _publish_steps(self, batch: list[wire.GenerationRequest], prompts: list[list[int]],
                             queue: asyncio.Queue[list[int] | None], started: float) -> None:
        detoks = [IncrementalDetokenizer(self._loaded.tokenizer, p) for p in prompts]
        counts = [0] * len(batch)
        text_sent = [0] * len(batch)
        first: list[float | None] = [None] * len(batch)
        while (step := await queue.get()) is not None:
            for row, token in enumerate(step):
                request = batch[row]
                if counts[row] >= request.params.max_new_tokens:
                    continue
                first[row] = first[row] or time.time()
                text = detoks[row].push(token)
                chunk = wire.TokenChunk(request.request_id, counts[row], text, [token],
                                        offset=counts[row], text_offset=text_sent[row])
                counts[row] += 1
                text_sent[row] += len(text)
                await self._send(request, chunk)
        now = time.time()
        for row, request in enumerate(batch):
            origin = request.submitted_at or started
            timings = wire.Timings(started - origin, (first[row] or now) - origin, now - origin)
            await self._send(request, wire.FinalMessage(
                request.request_id, counts[row], "length",
                wire.Usage(len(prompts[row]), counts[row]), timings))
        await self._producer.flush()

    async def _send(self, request: wire.GenerationRequest, message: wire.ResponseMessage) -> None:
        await self._producer.send(request.reply_topic or self._topics.responses,
                                  wire.encode(message), key=request.request_id.encode())


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = [[pad] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids), torch.tensor(mask)


def offline_ceiling(loaded: LoadedModel, prompts: list[str], new_tokens: int,
                    batch_sizes: tuple[int, ...] = (8, 16, 32, 64), *,
                    batches: int = 2) -> dict[str, float]:
    """Tokens/s of ``generate()`` alone (no Kafka) at each batch size, over ``batches``
    full batches each; the best is the ceiling."""
    rates: dict[str, float] = {}
    for size in batch_sizes:
        sample = _cycled(prompts, size * batches)
        started = time.perf_counter()
        for i in range(0, len(sample), size):
            encoded = [loaded.tokenizer(p).input_ids for p in sample[i:i + size]]
            ids, mask = _left_pad(encoded, loaded.pad_id)
            with torch.inference_mode():
                loaded.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=loaded.pad_id)
        rates[str(size)] = len(sample) * new_tokens / (time.perf_counter() - started)
    return rates


def offline_engine(loaded: LoadedModel, prompts: list[str], new_tokens: int,
                   batch_size: int, threads: int | None = None, *,
                   temperature: float = 0.0, top_p: float = 1.0) -> float:
    """Tokens/s of streamproc's engine stepped in a loop with no Kafka, refilling its batch
    up to ``batch_size`` as sequences finish: the gap between this and the streamproc run
    is what serving costs; the gap to the ceiling is the engine's own. ``threads``: torch's
    CPU threads for this run only (default: as they are). Greedy unless ``temperature``."""
    params = wire.GenerationParams(max_new_tokens=new_tokens, ignore_eos=True,
                                   temperature=temperature, top_p=top_p)
    sample = _cycled(prompts, batch_size * 2)
    pending = [PreparedRequest(wire.GenerationRequest(request_id=f"offline-{i}", prompt=p,
                                                      params=params),
                               loaded.tokenizer(p).input_ids, new_tokens, time.time())
               for i, p in enumerate(sample)]
    before = torch.get_num_threads()
    # Set on the thread that runs the kernels: that is where torch's pool size applies.
    torch.set_num_threads(threads or before)
    try:
        return _step_until_done(Engine(loaded), pending, batch_size)
    finally:
        torch.set_num_threads(before)


def _step_until_done(engine: Engine, pending: list[PreparedRequest], batch_size: int) -> float:
    """Tokens generated per second, keeping the batch full while any wait."""
    engine.warm_up()
    generated, started = 0, time.perf_counter()
    while pending or engine.num_running:
        free = batch_size - engine.num_running
        admitted, pending = pending[:free], pending[free:]
        generated += sum(len(e.token_ids) for e in engine.step(admitted))
    return generated / (time.perf_counter() - started)


def _cycled(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts, ``prompts`` repeated as often as needed."""
    return (prompts * (count // max(1, len(prompts)) + 1))[:count]
