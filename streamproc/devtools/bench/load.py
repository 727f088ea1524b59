"""The load generator: submit arrivals on their schedule and follow every stream.

Every latency is taken on this process's clock from the moment of submit; a
request that never finishes keeps its observation (and so counts as lost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import suppress

from streamproc import wire
from streamproc.client import ResultStream, StreamprocClient
from streamproc.devtools.bench.measure import Observation
from streamproc.devtools.bench.trace import Arrival

Tick = Callable[[list[Observation]], None]


async def replay(client: StreamprocClient, trace: list[Arrival], drain_timeout_s: float, *,
                 tick: Tick | None = None, tick_s: float = 10.0) -> list[Observation]:
    """Submit ``trace`` on schedule and wait up to ``drain_timeout_s`` for every stream to
    end; what has not ended by then stays unfinished. ``tick`` is shown the observations
    so far every ``tick_s`` seconds, for progress."""
    observations: list[Observation] = []
    ticking = asyncio.create_task(_tick(tick, observations, tick_s)) if tick else None
    try:
        followers = await submit_on_schedule(client, trace, observations)
        await asyncio.wait(followers, timeout=drain_timeout_s)
        for follower in followers:
            follower.cancel()
    finally:
        if ticking is not None:
            ticking.cancel()
            with suppress(asyncio.CancelledError):
                await ticking
    return observations


async def _tick(tick: Tick, observations: list[Observation], every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        tick(observations)


async def submit_on_schedule(client: StreamprocClient, trace: list[Arrival],
                             observations: list[Observation]) -> list[asyncio.Task[None]]:
    """Submit each arrival at its time, appending its observation to ``observations``;
    each follower fills its observation in place, so a request that never finishes still
    counts (as lost)."""
    start = time.monotonic()
    followers: list[asyncio.Task[None]] = []
    params_by_tokens: dict[int, wire.GenerationParams] = {}
    for arrival in trace:
        delay = start + arrival.at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        params = params_by_tokens.setdefault(arrival.max_new_tokens, wire.GenerationParams(
            max_new_tokens=arrival.max_new_tokens, ignore_eos=True))
        observation = Observation(arrival.phase, time.time())
        stream = await client.submit(arrival.prompt, params=params)
        observations.append(observation)
        followers.append(asyncio.create_task(follow(stream, observation)))
    return followers


async def follow(stream: ResultStream, observation: Observation) -> None:
    last: float | None = None
    async for chunk in stream:
        now = time.time()
        if last is None:
            observation.first_token = now
        elif chunk.token_ids:
            observation.gaps += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
        last = now
        observation.tokens += len(chunk.token_ids)
    observation.finished = time.time()
