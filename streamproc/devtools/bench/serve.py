"""One benchmark peer in its own process: ``python -m streamproc.devtools.bench.serve SPEC``.

Each peer runs apart from the load generator, as a worker runs apart from its
clients in production: the client's work of reading every chunk does not share
the peer's interpreter lock. SPEC is the JSON of a :class:`PeerSpec`. The
process prints ``ready`` once it consumes, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import uuid
from dataclasses import replace
from typing import Protocol

import msgspec

from streamproc.cli.common import run
from streamproc.config import TopicNames, WorkerConfig
from streamproc.devtools.bench.peers import GeneratePeer
from streamproc.engine.loader import LoadedModel, describe_model, load_model
from streamproc.worker.app import Worker

READY = "ready"


class Peer(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class PeerSpec(msgspec.Struct, frozen=True):
    name: str
    """naive, fixed_window, or streamproc (any name starting with it)."""
    bootstrap: str
    topics: TopicNames
    model: str
    ttft_target_s: float
    itl_target_s: float
    fixed_window_s: float
    fixed_batch: int
    max_batch_size: int
    trace_file: str = ""
    """streamproc's step trace (:mod:`streamproc.metrics.trace`); empty: none."""
    cpu_threads: int = 0
    """torch's CPU threads, every peer alike (0: the worker's policy)."""
    prefix_cache_bytes: int | None = None
    """streamproc's prefix cache (None: the worker's default; 0: off)."""


def make_peer(spec: PeerSpec, loaded: LoadedModel) -> Peer:
    group = f"bench-{spec.name}-{uuid.uuid4().hex[:6]}"
    if spec.name == "naive":
        return GeneratePeer(spec.bootstrap, spec.topics, loaded, group, batch_size=1,
                            window_s=0.0, cpu_threads=spec.cpu_threads)
    if spec.name == "fixed_window":
        return GeneratePeer(spec.bootstrap, spec.topics, loaded, group,
                            batch_size=spec.fixed_batch, window_s=spec.fixed_window_s,
                            cpu_threads=spec.cpu_threads)
    config = WorkerConfig(bootstrap=spec.bootstrap, topics=spec.topics, model=spec.model,
                          group_id=group, ttft_target_ms=spec.ttft_target_s * 1000,
                          itl_target_ms=spec.itl_target_s * 1000,
                          max_batch_size=spec.max_batch_size,
                          max_inflight=max(512, spec.max_batch_size),
                          trace_file=spec.trace_file, cpu_threads=spec.cpu_threads)
    if spec.prefix_cache_bytes is not None:
        config = replace(config, prefix_cache_bytes=spec.prefix_cache_bytes)
    return Worker(config, loaded)


async def serve(spec: PeerSpec) -> None:
    # streamproc's engine loads the weights in its own process, as a worker's does.
    describe = spec.name.startswith("streamproc")
    loaded = (describe_model if describe else load_model)(spec.model, "auto")
    peer = make_peer(spec, loaded)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await peer.start()
    # As the worker does for itself: what the peer holds from now on (its model, the
    # imported modules) stays out of full collections, which would stall its event loop.
    gc.collect()
    gc.freeze()
    print(READY, flush=True)
    try:
        await stop.wait()
    finally:
        await peer.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m streamproc.devtools.bench.serve SPEC_JSON", file=sys.stderr)
        return 2
    run(serve(msgspec.json.decode(argv[0], type=PeerSpec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
