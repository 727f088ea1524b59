"""Shutdown steps that wait on a broker are bounded, whatever the Kafka client does."""

from __future__ import annotations

import asyncio

import pytest

from streamproc.kafka import close_within, steps_within


async def test_a_step_that_never_ends_is_given_up_after_its_time() -> None:
    forever = asyncio.Event()
    assert not await close_within("waiting forever", forever.wait(), 0.05)


async def test_a_step_cancelled_inside_the_library_is_given_up_not_raised() -> None:
    async def stop_whose_own_task_was_cancelled() -> None:
        inner = asyncio.create_task(asyncio.sleep(10))
        inner.cancel()
        await inner  # what aiokafka's fetcher does on close: raises CancelledError

    assert not await close_within("closing", stop_whose_own_task_was_cancelled(), 5)


async def test_a_finished_step_counts_and_a_cancelled_caller_stays_cancelled() -> None:
    assert await close_within("quick", asyncio.sleep(0), 5)
    caller = asyncio.create_task(close_within("slow", asyncio.sleep(10), 30))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_steps_share_one_time_limit(caplog: pytest.LogCaptureFixture) -> None:
    forever = asyncio.Event()
    ran = []

    async def quick() -> None:
        ran.append("quick")

    await steps_within((("first", forever.wait), ("second", forever.wait),
                        ("third", quick)), 0.3)
    # The first used up the time: the ones after it are given up at once, not given their own.
    assert "first did not finish within 0.3s" in caplog.text
    assert "second did not finish within 0.0s" in caplog.text
    assert "third did not finish within 0.0s" in caplog.text
    assert not ran
