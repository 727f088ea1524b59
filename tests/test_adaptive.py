"""The adaptive window controller and policy, driven by made-up latencies."""

import pytest

from streamproc.admission.adaptive import AdaptiveController, ControllerSettings, SmoothedP95
from streamproc.admission.policy import AdaptivePolicy, BatchDecision

SETTINGS = ControllerSettings(ttft_target_s=1.0, itl_target_s=0.1, window_min_s=0.001,
                              window_max_s=0.1, admit_min=1, admit_max=32, running_max=64,
                              window_step_s=0.002, admit_step=1, every_n_steps=4, lag_high=100)


def run(controller: AdaptiveController, steps: int, itl: float, ttft: float,
        lag: int = 0, running: int = 0) -> list[str]:
    reasons = []
    for _ in range(steps):
        controller.observe_step(itl, [ttft], running)
        adjustment = controller.adjust(lag)
        if adjustment is not None:
            reasons.append(adjustment.reason)
    return reasons


def test_p95_estimate_tracks_a_latency_distribution() -> None:
    estimate = SmoothedP95(alpha=0.05)
    values = [0.05 + 0.01 * (i % 11) for i in range(2000)]  # 0.05 .. 0.15, uniform
    for value in values:
        estimate.observe(value)
    assert 0.13 <= estimate.p95 <= 0.17


def test_grows_admission_additively_while_there_is_slack() -> None:
    controller = AdaptiveController(SETTINGS)
    admit = controller.admit_size
    reasons = run(controller, 4 * 5, itl=0.02, ttft=0.1)
    assert reasons == ["slack"] * 5
    assert controller.admit_size == admit + 5
    assert controller.window_s == pytest.approx(SETTINGS.window_min_s)  # nothing to gather


def test_high_lag_with_slack_leans_toward_throughput() -> None:
    controller = AdaptiveController(SETTINGS)
    window, admit = controller.window_s, controller.admit_size
    assert run(controller, 4 * 3, itl=0.02, ttft=0.1, lag=500) == ["slack_lag_high"] * 3
    assert controller.admit_size == admit + 2 * 3
    assert controller.window_s == pytest.approx(window + 2 * 0.002 * 3)


def test_with_slack_and_no_backlog_the_window_steps_back_down() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 10, itl=0.02, ttft=0.1, lag=500)
    grown = controller.window_s
    assert run(controller, 4 * 2, itl=0.02, ttft=0.1, lag=0) == ["slack"] * 2
    assert controller.window_s == pytest.approx(grown - 2 * 0.002)


def test_inter_token_latency_over_target_cuts_admission_multiplicatively() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 20, itl=0.02, ttft=0.1, lag=500)  # grow first
    grown = controller.admit_size
    assert run(controller, 4, itl=0.5, ttft=0.1)[-1] == "itl_over_target"
    assert controller.admit_size == grown // 2


def test_ttft_over_target_shortens_the_window_multiplicatively() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 20, itl=0.02, ttft=0.1, lag=500)
    grown = controller.window_s
    assert run(controller, 4, itl=0.02, ttft=3.0)[-1] == "ttft_over_target"
    assert controller.window_s == pytest.approx(grown / 2)


def test_inside_the_band_nothing_moves_so_it_does_not_oscillate() -> None:
    controller = AdaptiveController(SETTINGS)
    window, admit = controller.window_s, controller.admit_size
    # Around 0.09 s with jitter: under the target, above the 0.8 slack line. Hold.
    reasons = []
    for step in range(400):
        controller.observe_step(0.085 if step % 2 else 0.095, [0.5])
        adjustment = controller.adjust()
        if adjustment is not None:
            reasons.append(adjustment.reason)
    assert set(reasons) == {"within_band"}
    assert (controller.window_s, controller.admit_size) == (window, admit)


def test_knobs_stay_within_bounds() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 500, itl=0.001, ttft=0.01, lag=500)
    assert controller.window_s == pytest.approx(SETTINGS.window_max_s)
    assert controller.admit_size == SETTINGS.admit_max
    run(controller, 4 * 50, itl=5.0, ttft=50.0)
    assert controller.admit_size == SETTINGS.admit_min
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 50, itl=0.01, ttft=50.0)
    assert controller.window_s == pytest.approx(SETTINGS.window_min_s)


def test_slow_steps_cap_the_running_batch_below_its_size_then_slack_regrows_it() -> None:
    controller = AdaptiveController(SETTINGS)
    assert controller.running_cap == 64  # optimistic: the whole batch
    # 40 sequences decode too slowly: the cap goes below 40, not below the unused 64.
    assert run(controller, 4, itl=0.5, ttft=0.1, running=40) == ["itl_over_target"]
    assert controller.running_cap == 20
    run(controller, 4 * 10, itl=0.5, ttft=0.1, running=20)
    assert controller.running_cap == SETTINGS.admit_min
    reasons = run(controller, 4 * 60, itl=0.02, ttft=0.1, running=1)
    assert reasons[-1] == "slack"  # once the smoothed p95 has come back down
    assert controller.running_cap == 64

    fresh = AdaptiveController(SETTINGS)
    fresh.running_cap = 1
    grown = []
    for _ in range(3):
        run(fresh, 4, itl=0.02, ttft=0.1, running=1)
        grown.append(fresh.running_cap)
    assert grown == [5, 9, 13]  # additively, 1/16 of the range a time


def test_policy_admits_nothing_at_the_running_cap() -> None:
    controller = AdaptiveController(SETTINGS)
    controller.running_cap = 5
    capped = AdaptivePolicy(controller, max_batch_size=8, max_batch_tokens=100)
    assert capped.running_cap == 5
    assert capped.decide([5] * 6, 1.0, running=5) == BatchDecision(0, None)
    assert capped.decide([5] * 6, 1.0, running=3) == BatchDecision(2, None)


def test_decides_only_every_n_steps() -> None:
    controller = AdaptiveController(SETTINGS)
    controller.observe_step(0.01, [])
    assert controller.adjust() is None


def policy(window_s: float, admit: int) -> AdaptivePolicy:
    controller = AdaptiveController(SETTINGS)
    controller.window_s, controller.admit_size = window_s, admit
    return AdaptivePolicy(controller, max_batch_size=8, max_batch_tokens=100)


def test_policy_gathers_until_the_window_or_a_full_admission() -> None:
    assert policy(0.010, 4).decide([5, 5], 0.004, running=3) == BatchDecision(0, 0.006)
    assert policy(0.010, 4).decide([5, 5], 0.010, running=3) == BatchDecision(2, None)
    assert policy(0.010, 4).decide([5] * 6, 0.0, running=3) == BatchDecision(4, None)


def test_policy_respects_free_slots_and_tokens() -> None:
    assert policy(0.0, 8).decide([5] * 6, 0.0, running=6) == BatchDecision(2, None)
    assert policy(0.0, 8).decide([60, 60], 0.0, running=0) == BatchDecision(1, None)
    assert policy(0.0, 8).decide([5], 0.0, running=8) == BatchDecision(0, None)
