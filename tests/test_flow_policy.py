"""Pure flow-control decisions: pause/resume, drain time, group health, admission, shedding."""

import math

from aiokafka import TopicPartition

from streamproc.flow.admission import AdmissionPolicy, Decision, decide
from streamproc.flow.lag import GroupSample, Throughput, drain_time_s, group_status
from streamproc.flow.ledger import Ledger
from streamproc.flow.shedding import cannot_meet_deadline
from streamproc.metrics.stats import RateMeter

TP = TopicPartition("lane", 0)


def test_budget_pauses_at_the_request_cap_and_resumes_below_low_water() -> None:
    ledger = Ledger(max_requests=4, max_tokens=10_000)
    tickets = [ledger.read(TP, offset) for offset in range(3)]
    assert ledger.gate(paused=False) == "hold"
    ledger.read(TP, 3)
    assert ledger.gate(paused=False) == "pause"
    assert ledger.room() == 1  # still polls, so the group membership stays alive
    ledger.done(tickets[0])
    assert ledger.gate(paused=True) == "resume"  # 3 <= 4 * 0.75


def test_budget_hysteresis_holds_between_the_marks() -> None:
    ledger = Ledger(max_requests=8, max_tokens=10_000)
    for offset in range(7):
        ledger.read(TP, offset)
    assert ledger.gate(paused=True) == "hold"  # 7 > 6: not low enough to resume


def test_budget_pauses_on_tokens_alone() -> None:
    ledger = Ledger(max_requests=100, max_tokens=1000)
    first, second = ledger.read(TP, 0), ledger.read(TP, 1)
    ledger.cost(first, tokens=600, work=100)
    ledger.cost(second, tokens=500, work=50)
    assert ledger.gate(paused=False) == "pause"
    assert ledger.work == 150
    ledger.done(second)
    assert ledger.gate(paused=True) == "resume"


def test_budget_releases_revoked_partitions() -> None:
    ledger = Ledger(max_requests=10, max_tokens=100)
    other = TopicPartition("lane", 1)
    ledger.cost(ledger.read(TP, 0), tokens=10, work=0)
    ledger.cost(ledger.read(other, 0), tokens=20, work=0)
    ledger.revoke({TP})
    assert (ledger.requests, ledger.tokens) == (1, 20)


def test_drain_time_is_lag_times_tokens_per_request_over_rate() -> None:
    assert drain_time_s(100, Throughput(200.0, 50.0, 2)) == 25.0
    assert drain_time_s(0, Throughput(0.0, 0.0, 0)) == 0.0
    assert math.isinf(drain_time_s(5, Throughput(0.0, 50.0, 0)))


def sample(lag: int, committed: int, members: int = 1, at: float = 0.0) -> GroupSample:
    return GroupSample(at, lag, committed, members)


def test_group_status_ok_when_lag_is_zero_or_shrinking() -> None:
    assert group_status([]) == "OK"
    assert group_status([sample(0, 10)]) == "OK"
    assert group_status([sample(50, 10), sample(40, 20), sample(30, 30)]) == "OK"


def test_group_status_warn_when_lag_keeps_growing_while_committing() -> None:
    assert group_status([sample(10, 1), sample(20, 5), sample(30, 9)]) == "WARN"
    assert group_status([sample(10, 1), sample(20, 5), sample(20, 9)]) == "OK"


def test_group_status_stall_when_offsets_stop_moving_with_lag() -> None:
    assert group_status([sample(10, 7), sample(12, 7), sample(15, 7)]) == "STALL"


def test_group_status_stop_when_nobody_is_left_to_commit() -> None:
    assert group_status([sample(10, 7, members=0)]) == "STOP"
    assert group_status([sample(0, 7, members=0)]) == "OK"


def test_admission_admits_under_the_limit() -> None:
    for mode in ("block", "reject", "shed"):
        policy = AdmissionPolicy(mode=mode, max_drain_s=10)
        assert decide(policy, 9.9, priority=0) == Decision("admit")


def test_admission_over_the_limit_depends_on_mode() -> None:
    assert decide(AdmissionPolicy("block", 10), 25, 0) == Decision("wait", 15)
    assert decide(AdmissionPolicy("reject", 10), 25, 5) == Decision("refuse", 15)
    shed = AdmissionPolicy("shed", 10, shed_below_priority=2)
    assert decide(shed, 25, 1) == Decision("refuse", 15)
    assert decide(shed, 25, 2) == Decision("wait", 15)


def test_admission_with_unknown_throughput_retries_after_the_limit() -> None:
    assert decide(AdmissionPolicy("reject", 10), math.inf, 0) == Decision("refuse", 10)


def test_shedding_only_when_the_deadline_cannot_be_met() -> None:
    assert cannot_meet_deadline(100.0, 101.0, backlog_tokens=900, own_tokens=200,
                                tokens_per_s=1000.0)
    assert not cannot_meet_deadline(100.0, 102.0, 900, 200, 1000.0)
    assert not cannot_meet_deadline(100.0, None, 10**9, 200, 1000.0)
    assert not cannot_meet_deadline(100.0, 100.5, 10**9, 200, 0.0)  # rate unknown: serve


def test_rate_meter_measures_busy_time_and_keeps_the_last_rate_when_idle() -> None:
    meter = RateMeter(window_s=10)
    meter.record(100, 0.5, now=0.0)
    meter.record(100, 0.5, now=1.0)
    assert meter.tokens_per_s == 200.0
    meter.record(0, 0.0, now=100.0)  # long idle: the window empties
    assert meter.tokens_per_s == 200.0
