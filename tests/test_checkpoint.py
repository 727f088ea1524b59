import pytest
from aiokafka import TopicPartition

from streamproc.flow.checkpoint import Checkpoint

TP = TopicPartition("requests", 0)


def test_commits_only_up_to_the_lowest_unfinished_offset() -> None:
    cp = Checkpoint()
    for offset in (5, 6, 7):
        cp.track(TP, offset)
    cp.done(TP, 7)
    cp.done(TP, 6)
    assert cp.committable() == {TP: 5}
    cp.done(TP, 5)
    assert cp.committable() == {TP: 8}


def test_committed_offsets_are_not_offered_again() -> None:
    cp = Checkpoint()
    cp.track(TP, 0)
    cp.done(TP, 0)
    cp.committed(cp.committable())
    assert cp.committable() == {}
    assert cp.in_flight() == 0


def test_commits_never_go_backwards() -> None:
    cp = Checkpoint()
    cp.committed({TP: 10})
    with pytest.raises(AssertionError):
        cp.committed({TP: 9})


def test_forgetting_a_revoked_partition_drops_its_state() -> None:
    cp = Checkpoint()
    other = TopicPartition("requests", 1)
    cp.track(TP, 0)
    cp.track(other, 3)
    cp.forget({TP})
    cp.done(TP, 0)  # a late ack for a revoked partition is harmless
    assert cp.committable() == {other: 3}
    assert cp.in_flight() == 1


def test_only_filter_limits_to_given_partitions() -> None:
    cp = Checkpoint()
    other = TopicPartition("requests", 1)
    for tp in (TP, other):
        cp.track(tp, 0)
        cp.done(tp, 0)
    assert cp.committable({other}) == {other: 1}
