"""Commits that cannot go backwards or stick, without a broker: the ledger's epochs, the
committer's ordering against revocation, and a failed publish that is never silent."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import TopicPartition

from streamproc.channel import Job
from streamproc.engine.sequence import PreparedRequest
from streamproc.flow.ledger import Ledger, Ticket
from streamproc.publish.publisher import Publisher
from streamproc.wire import GenerationRequest
from streamproc.worker.commits import Committer

TP = TopicPartition("requests", 0)
OTHER = TopicPartition("requests", 1)


def finished(ledger: Ledger, tp: TopicPartition, offsets: range) -> list[Ticket]:
    tickets = [ledger.read(tp, o) for o in offsets]
    for ticket in tickets:
        ledger.done(ticket)
    return tickets


@dataclass
class GatedConsumer:
    """Commits wait for ``gate``, as aiokafka's do through a broker outage; only the ones
    that complete are what the group ends up with."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    landed: list[dict[TopicPartition, int]] = field(default_factory=list)
    started: int = 0

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.started += 1
        await self.gate.wait()
        self.landed.append(dict(offsets))


async def nothing() -> None:
    pass


async def test_a_commit_held_through_a_rebalance_never_lands_after_it() -> None:
    ledger, consumer = Ledger(100, 10_000), GatedConsumer()
    committer = Committer(consumer, ledger, timeout_s=0.2)
    ledger.assign({TP})
    finished(ledger, TP, range(0, 10))
    periodic = asyncio.create_task(committer.commit())  # computed now: offset 10
    await asyncio.sleep(0.05)
    assert consumer.started == 1
    # The rebalance: this worker loses the partition and gets it back at once; the new
    # assignment reads on and commits 26, with the outage over.
    await committer.revoke({TP}, nothing)
    await periodic
    ledger.assign({TP})
    finished(ledger, TP, range(10, 26))
    consumer.gate.set()
    await committer.commit()
    await asyncio.sleep(0.05)  # any stale retry would land now
    assert consumer.landed == [{TP: 26}]


async def test_a_revocation_waits_for_the_commit_under_way() -> None:
    ledger, consumer = Ledger(100, 10_000), GatedConsumer()
    committer = Committer(consumer, ledger, timeout_s=5.0)
    ledger.assign({TP, OTHER})
    finished(ledger, TP, range(0, 4))
    finished(ledger, OTHER, range(0, 2))
    periodic = asyncio.create_task(committer.commit())
    await asyncio.sleep(0.05)
    revoking = asyncio.create_task(committer.revoke({TP}, nothing))
    await asyncio.sleep(0.05)
    assert not revoking.done()  # it waits: the commit under way is for this partition
    consumer.gate.set()
    await periodic
    await revoking
    assert consumer.landed == [{TP: 4, OTHER: 2}]
    assert ledger.committable() == {}  # TP forgotten, OTHER committed


def test_an_ack_from_an_earlier_assignment_changes_nothing() -> None:
    ledger = Ledger(100, 10_000)
    ledger.assign({TP})
    [stale] = [ledger.read(TP, 5)]
    ledger.cost(stale, 100, 10)
    ledger.revoke({TP})
    assert (ledger.requests, ledger.tokens, ledger.work) == (0, 0, 0)
    ledger.assign({TP})
    again = ledger.read(TP, 5)  # served again by this worker's next assignment
    assert not ledger.done(stale)
    ledger.cost(stale, 999, 999)
    assert ledger.requests == 1
    assert ledger.tokens == 0
    assert ledger.committable() == {TP: (5, again.epoch)}  # not past the record in flight
    assert ledger.done(again)
    assert ledger.committable() == {TP: (6, again.epoch)}


def test_a_commit_result_for_an_earlier_assignment_is_not_recorded() -> None:
    ledger = Ledger(100, 10_000)
    ledger.assign({TP})
    finished(ledger, TP, range(0, 8))
    planned = ledger.committable()
    ledger.assign({TP})  # revoked and given back meanwhile
    finished(ledger, TP, range(3, 5))
    ledger.committed(planned)  # late: ignored
    assert ledger.committable()[TP][0] == 5


def test_commits_never_go_backwards_within_an_assignment() -> None:
    ledger = Ledger(100, 10_000)
    ledger.assign({TP})
    finished(ledger, TP, range(0, 8))
    planned = ledger.committable()
    ledger.committed(planned)
    with pytest.raises(AssertionError, match="backwards"):
        ledger.committed({TP: (3, planned[TP][1])})


def test_one_owner_counts_requests_tokens_and_the_fetch_gate() -> None:
    ledger = Ledger(max_requests=4, max_tokens=1000)
    tickets = [ledger.read(TP, o) for o in range(4)]
    for ticket in tickets:
        ledger.cost(ticket, 100, 10)
    assert (ledger.requests, ledger.tokens, ledger.work, ledger.room()) == (4, 400, 40, 1)
    assert ledger.gate(paused=False) == "pause"
    ledger.cost(tickets[0], 700, 10)  # 1000 tokens held: over the token cap too
    ledger.done(tickets[1])
    assert ledger.gate(paused=True) == "hold"  # 3 of 4 requests, but 1000 tokens
    ledger.done(tickets[0])
    assert ledger.gate(paused=True) == "resume"
    dropped = ledger.revoke({TP})
    assert sorted(t.offset for t in dropped) == [2, 3]
    assert (ledger.requests, ledger.tokens, ledger.work) == (0, 0, 0)
    assert ledger.next_offset(TP) is None


@dataclass
class RefusingProducer:
    """Every send fails as it does once the producer's delivery timeout has passed."""

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> asyncio.Future[object]:
        ack: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        ack.set_exception(KafkaTimeoutError("delivery timed out"))
        return ack

    async def flush(self) -> None:
        pass


async def test_a_publish_the_broker_refuses_is_reported_never_left_pending() -> None:
    ledger = Ledger(100, 10_000)
    ticket = ledger.read(TP, 7)
    acked: list[Ticket] = []
    failed: list[tuple[Ticket, BaseException]] = []
    publisher = Publisher(RefusingProducer(), "dead-letters", acked.append,
                          lambda t, exc: failed.append((t, exc)))
    request = GenerationRequest(request_id="r", prompt="-")
    job = Job(PreparedRequest(request, [1], 1, time.time()), ticket, "replies")
    await publisher.fail(job, "engine_error", "boom")
    await publisher.flush()
    assert acked == []
    assert [(t, type(e)) for t, e in failed] == [(ticket, KafkaTimeoutError)]
    assert ledger.requests == 1  # still held: the worker fails rather than skip it
