from streamproc.admission.policy import BatchDecision, FixedWindowPolicy

POLICY = FixedWindowPolicy(max_batch_size=4, max_batch_tokens=100, window_s=0.010)


def test_nothing_waiting_means_wait_for_arrivals() -> None:
    assert POLICY.decide([], 0.0, running=0) == BatchDecision(0, None)


def test_idle_engine_gathers_until_the_window_closes() -> None:
    assert POLICY.decide([10], 0.004, running=0) == BatchDecision(0, 0.006)
    assert POLICY.decide([10, 10], 0.010, running=0) == BatchDecision(2, None)


def test_a_full_batch_does_not_wait_for_the_window() -> None:
    assert POLICY.decide([10] * 4, 0.0, running=0) == BatchDecision(4, None)
    assert POLICY.decide([10] * 6, 0.0, running=0) == BatchDecision(4, None)


def test_busy_engine_admits_newcomers_at_the_next_step() -> None:
    assert POLICY.decide([10], 0.0, running=2) == BatchDecision(1, None)


def test_admission_respects_free_slots() -> None:
    assert POLICY.decide([10] * 3, 0.0, running=3) == BatchDecision(1, None)
    assert POLICY.decide([10], 0.0, running=4) == BatchDecision(0, None)


def test_token_budget_limits_the_prefill_batch() -> None:
    assert POLICY.decide([60, 30, 20], 0.0, running=0) == BatchDecision(2, None)


def test_a_prompt_larger_than_the_budget_is_admitted_alone() -> None:
    assert POLICY.decide([500, 10], 0.0, running=0) == BatchDecision(1, None)
