"""The two ways a worker runs its engine, on a thread of its own and in a process of its
own, against the same real (tiny) model: what the serving loop relies on."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel, describe_model
from streamproc.engine.sequence import PreparedRequest, TokenEvent
from streamproc.errors import EngineError, EngineStepError
from streamproc.wire import GenerationParams, GenerationRequest
from streamproc.worker.engine_process import (
    PIPE_BYTES,
    EngineProcess,
    EngineSpec,
    _widen,
)
from streamproc.worker.engine_thread import EngineThread
from streamproc.worker.steps import EngineRunner, StepResult

from .helpers import reference_tokens

pytestmark = pytest.mark.model
RUNNERS = ("thread", "process")


def prepared(rid: str, prompt_ids: list[int], max_new: int) -> PreparedRequest:
    request = GenerationRequest(request_id=rid, prompt="-",
                                params=GenerationParams(max_new_tokens=max_new))
    return PreparedRequest(request, prompt_ids, max_new, time.time())


def spec(model: str) -> EngineSpec:
    return EngineSpec(model, "cpu", False, 512, 1)


@pytest.fixture(params=RUNNERS)
async def runner(request: pytest.FixtureRequest, loaded_model: LoadedModel,
                 tiny_model_dir: Path) -> AsyncIterator[EngineRunner]:
    started: EngineRunner
    if request.param == "thread":
        started = EngineThread(Engine(loaded_model))
    else:
        started = EngineProcess(spec(str(tiny_model_dir)))
    await started.start()
    yield started
    started.stop()


async def collect(runner: EngineRunner, want_final: set[str]
                  ) -> tuple[dict[str, list[TokenEvent]], list[StepResult]]:
    """Results, without posting anything more, until every request in ``want_final`` ended."""
    events: dict[str, list[TokenEvent]] = {}
    steps = []
    while want_final:
        result = await asyncio.wait_for(runner.next_result(), 30)
        assert isinstance(result, StepResult), result
        steps.append(result)
        for event in result.events:
            events.setdefault(event.request_id, []).append(event)
            if event.outcome is not None:
                want_final.discard(event.request_id)
    return events, steps


async def test_it_steps_on_its_own_and_matches_generate(runner: EngineRunner,
                                                         loaded_model: LoadedModel) -> None:
    a, b = prepared("a", [5, 9, 14, 3], 12), prepared("b", [7, 7, 30], 6)
    runner.submit([a, b], frozenset(), frozenset())
    assert runner.expecting
    # One submit, then only collecting: the engine ran every step after the first by itself.
    events, steps = await collect(runner, {"a", "b"})
    assert len(steps) >= 12
    for request in (a, b):
        got = [t for e in events[request.request_id] for t in e.token_ids]
        assert got == reference_tokens(loaded_model, request.prompt_ids,
                                       request.max_new_tokens)
        assert events[request.request_id][0].source is request  # the very object admitted
    assert not runner.expecting


async def test_log_probabilities_and_penalties_cross_to_the_loop(runner: EngineRunner) -> None:
    """What the engine computes per token for a request that asks arrives whole, across a
    process boundary too."""
    params = GenerationParams(max_new_tokens=6, logprobs=True, top_logprobs=2,
                              frequency_penalty=1.0, top_k=3, temperature=0.9, seed=4)
    request = GenerationRequest(request_id="lp", prompt="-", params=params)
    asking = PreparedRequest(request, [5, 9, 14, 3], 6, time.time())
    runner.submit([asking], frozenset(), frozenset())
    events, _ = await collect(runner, {"lp"})
    tokens = [t for e in events["lp"] for t in e.token_ids]
    logprobs = [lp for e in events["lp"] for lp in (e.logprobs or [])]
    assert len(logprobs) == len(tokens) == 6
    for entry in logprobs:
        assert entry.logprob <= 0
        assert len(entry.top) == 2
        assert entry.top[0].logprob >= entry.top[1].logprob


async def test_it_runs_at_most_two_steps_ahead_of_the_loop(runner: EngineRunner) -> None:
    runner.submit([prepared("long", [4, 5, 6], 40)], frozenset(), frozenset())
    await asyncio.sleep(1.0)  # far longer than a few steps: the engine waits for us
    collecting_from = time.monotonic()
    first = [await runner.next_result() for _ in range(3)]
    assert all(isinstance(r, StepResult) for r in first)
    ended = [r.ended for r in first if isinstance(r, StepResult)]
    assert ended[1] < collecting_from < ended[2]
    await collect(runner, {"long"})


async def test_abandoned_requests_go_silently_and_cancelled_ones_end(
        runner: EngineRunner) -> None:
    gone, cut, kept = (prepared("gone", [4, 5], 40), prepared("cut", [6, 7], 40),
                       prepared("kept", [8, 9], 5))
    runner.submit([gone, cut, kept], frozenset(), frozenset())
    first = await runner.next_result()
    assert isinstance(first, StepResult)
    runner.submit([], frozenset({gone.key}), frozenset({cut.key}))
    events, _ = await collect(runner, {"cut", "kept"})
    for event in first.events:
        events.setdefault(event.request_id, []).insert(0, event)
    outcomes = [e.outcome for e in events["cut"] if e.outcome is not None]
    assert [o.finish_reason for o in outcomes] == ["cancelled"]
    assert sum(len(e.token_ids) for e in events["kept"]) == 5
    # The first step, and at most the step under way when the abandon was posted.
    assert len(events["gone"]) <= 3
    assert all(e.outcome is None for e in events["gone"])
    while runner.expecting:
        result = await asyncio.wait_for(runner.next_result(), 30)
        assert isinstance(result, StepResult)
        assert not [e for e in result.events if e.request_id == "gone"]


async def test_a_failed_step_resets_and_serves_again_after_recover(
        runner: EngineRunner, loaded_model: LoadedModel) -> None:
    vocab = len(loaded_model.tokenizer)
    runner.submit([prepared("bad", [vocab + 1000], 3), prepared("ok", [5], 30)], frozenset(),
                  frozenset())
    failed = await asyncio.wait_for(runner.next_result(), 30)
    assert isinstance(failed, EngineStepError)
    assert "IndexError" in str(failed)
    # Posted before the loop saw the failure: dropped with the failed requests.
    runner.submit([prepared("stale", [5], 3)], frozenset(), frozenset())
    runner.recover()
    runner.submit([prepared("after", [5, 6], 4)], frozenset(), frozenset())
    events, _ = await collect(runner, {"after"})
    assert set(events) == {"after"}  # nothing of "ok" or "stale" comes back
    assert sum(len(e.token_ids) for e in events["after"]) == 4


async def test_the_engine_process_logs_in_the_workers_format(
        tiny_model_dir: Path, loaded_model: LoadedModel, capfd: pytest.CaptureFixture[str],
        json_logs: None) -> None:
    runner = EngineProcess(spec(str(tiny_model_dir)))
    await runner.start()
    try:
        vocab = len(loaded_model.tokenizer)
        runner.submit([prepared("bad", [vocab + 1000], 3)], frozenset(), frozenset())
        assert isinstance(await asyncio.wait_for(runner.next_result(), 30), EngineStepError)
    finally:
        runner.stop()
    # Every line on stderr, the child's included (from loading the model on), is JSON.
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    failures = [line for line in lines if line["logger"] == "streamproc.worker.runner"
                and "exception" in line]
    assert len(failures) == 1
    assert "IndexError" in failures[0]["exception"]  # the traceback only the child had


async def test_a_dead_engine_process_is_an_error_not_a_hang(tiny_model_dir: Path) -> None:
    runner = EngineProcess(spec(str(tiny_model_dir)))
    await runner.start()
    try:
        runner.submit([prepared("r", [5, 6], 500)], frozenset(), frozenset())
        await runner.next_result()
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="ended while serving"):
            await drain(runner)
        with pytest.raises(EngineError, match="ended while serving"):
            runner.submit([prepared("late", [5], 2)], frozenset(), frozenset())
    finally:
        runner.stop()


async def drain(runner: EngineRunner) -> None:
    """Collect results until one raises (each within 30 s)."""
    while True:
        await asyncio.wait_for(runner.next_result(), 30)


UNGUARDED_SCRIPT = """
import asyncio, sys
from streamproc.worker.engine_process import EngineProcess, EngineSpec

async def main():
    runner = EngineProcess(EngineSpec(sys.argv[1], "cpu", False, 512, 1))
    await runner.start()
    runner.stop()
    print("served")

asyncio.run(main())  # no __main__ guard, as a quick embedding script is written
"""


async def test_an_embedding_script_needs_no_main_guard(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    script = tmp_path / "embed.py"
    script.write_text(UNGUARDED_SCRIPT)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(tiny_model_dir), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert (process.returncode, out.decode().split()) == (0, ["served"]), err.decode()


async def test_an_engine_process_that_cannot_load_says_why(tmp_path: Path) -> None:
    runner = EngineProcess(spec(str(tmp_path / "no-such-model")))
    with pytest.raises(EngineError, match=r"did not start: .*no-such-model"):
        await runner.start()
    runner.stop()


def test_describing_a_model_gives_what_loading_gives_but_the_weights(
        loaded_model: LoadedModel, tiny_model_dir: Path) -> None:
    described = describe_model(str(tiny_model_dir), "cpu")
    assert described.model is None
    assert (described.device, described.dtype, described.max_context, described.eos_ids,
            described.pad_id) == (loaded_model.device, loaded_model.dtype,
                                  loaded_model.max_context, loaded_model.eos_ids,
                                  loaded_model.pad_id)
    assert described.tokenizer("kafka lag").input_ids == loaded_model.tokenizer(
        "kafka lag").input_ids


def test_the_pipes_hold_a_large_admission_without_the_worker_waiting() -> None:
    read, write = os.pipe()
    try:
        _widen(write)
        allowed = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        assert fcntl.fcntl(write, fcntl.F_GETPIPE_SZ) == min(PIPE_BYTES, allowed)
    finally:
        os.close(read)
        os.close(write)
