"""The ledger's watermark: commit only what is published, per partition, in order."""

from aiokafka import TopicPartition

from streamproc.flow.ledger import Ledger

TP = TopicPartition("requests", 0)
OTHER = TopicPartition("requests", 1)


def offsets(ledger: Ledger, only: set[TopicPartition] | None = None
            ) -> dict[TopicPartition, int]:
    return {tp: offset for tp, (offset, _) in ledger.committable(only).items()}


def test_commits_only_up_to_the_lowest_unfinished_offset() -> None:
    ledger = Ledger(100, 10_000)
    five, six, seven = (ledger.read(TP, o) for o in (5, 6, 7))
    ledger.done(seven)
    ledger.done(six)
    assert offsets(ledger) == {TP: 5}
    ledger.done(five)
    assert offsets(ledger) == {TP: 8}


def test_committed_offsets_are_not_offered_again() -> None:
    ledger = Ledger(100, 10_000)
    ledger.done(ledger.read(TP, 0))
    ledger.committed(ledger.committable())
    assert ledger.committable() == {}
    assert ledger.requests == 0


def test_revoking_a_partition_drops_its_state_and_late_acks_are_harmless() -> None:
    ledger = Ledger(100, 10_000)
    late = ledger.read(TP, 0)
    ledger.read(OTHER, 3)
    ledger.revoke({TP})
    assert not ledger.done(late)
    assert offsets(ledger) == {OTHER: 3}
    assert ledger.requests == 1


def test_only_filter_limits_to_given_partitions() -> None:
    ledger = Ledger(100, 10_000)
    for tp in (TP, OTHER):
        ledger.done(ledger.read(tp, 0))
    assert offsets(ledger, {OTHER}) == {OTHER: 1}
