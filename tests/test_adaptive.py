"""The adaptive window controller and policy, driven by made-up latencies."""

from dataclasses import replace

import pytest

from streamproc.admission.adaptive import AdaptiveController, ControllerSettings, RecentP95
from streamproc.admission.policy import AdaptivePolicy, BatchDecision

SETTINGS = ControllerSettings(ttft_target_s=1.0, itl_target_s=0.1, window_min_s=0.001,
                              window_max_s=0.1, admit_min=1, admit_max=32, running_max=64,
                              window_step_s=0.002, admit_step=1, every_n_steps=4,
                              min_itl_samples=4, lag_high=100)


def run(controller: AdaptiveController, steps: int, itl: float, ttft: float,
        lag: int = 0, running: int = 0, decode: float | None = None) -> list[str]:
    """``decode``: the decode-only step time (default: all of ``itl``)."""
    reasons = []
    for _ in range(steps):
        controller.observe_step(itl, [ttft], running, itl if decode is None else decode)
        adjustment = controller.adjust(lag)
        if adjustment is not None:
            reasons.append(adjustment.reason)
    return reasons


def test_p95_estimate_tracks_recent_latencies() -> None:
    estimate = RecentP95(size=100)
    for i in range(2000):
        estimate.observe(0.05 + 0.01 * (i % 11))  # 0.05 .. 0.15, uniform
    assert estimate.p95 == pytest.approx(0.15)
    for _ in range(100):
        estimate.observe(0.01)  # the old ones have left the window
    assert estimate.p95 == 0.01


def test_rare_spikes_do_not_inflate_the_p95() -> None:
    # 3% of steps carry a prefill: the p95 is a decode step, not a spike (a mean + 1.645 sd
    # estimate would say 0.015 here and cut the batch for nothing).
    estimate = RecentP95(size=100)
    for i in range(100):
        estimate.observe(0.030 if i % 33 == 0 else 0.008)
    assert estimate.p95 == 0.008


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


def test_with_a_backlog_late_first_tokens_lean_toward_throughput() -> None:
    # Under a backlog, time to first token is the wait in the queue: a shorter window
    # would not shorten it, more tokens/s does.
    controller = AdaptiveController(SETTINGS)
    controller.window_s = 0.05
    admit = controller.admit_size
    assert run(controller, 4 * 3, itl=0.02, ttft=3.0, lag=500) == ["slack_lag_high"] * 3
    assert controller.admit_size == admit + 2 * 3
    assert controller.window_s == pytest.approx(0.05 + 3 * 2 * 0.002)
    # The same late first tokens with no backlog: the window is what to shorten.
    assert run(controller, 4, itl=0.02, ttft=3.0, lag=0) == ["ttft_over_target"]
    # And with a backlog but inter-token latency near its target, nothing grows.
    assert run(controller, 4, itl=0.09, ttft=3.0, lag=500) == ["within_band"]


def test_with_slack_and_no_backlog_the_window_steps_back_down() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 10, itl=0.02, ttft=0.1, lag=500)
    grown = controller.window_s
    assert run(controller, 4 * 2, itl=0.02, ttft=0.1, lag=0) == ["slack"] * 2
    assert controller.window_s == pytest.approx(grown - 2 * 0.002)


def until(controller: AdaptiveController, reason: str, itl: float, ttft: float
          ) -> tuple[int, float, int, int]:
    """Adjustment periods of these latencies until one decides ``reason``; the admission
    size and window just before it, and the batch cap after it."""
    for periods in range(1, 20):
        admit, window = controller.admit_size, controller.window_s
        if run(controller, 4, itl=itl, ttft=ttft, running=30) == [reason]:
            return periods, window, admit, controller.running_cap
    raise AssertionError(f"never decided {reason}")


def test_inter_token_latency_over_target_cuts_admission_multiplicatively() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 20, itl=0.02, ttft=0.1, lag=500)  # grow first
    periods, _, admit, cap = until(controller, "itl_over_target_batch", itl=0.5, ttft=0.1)
    assert periods <= 2  # as soon as more than 5% of recent steps are slow
    assert controller.admit_size == admit // 2
    assert cap == 15  # half the 30 that ran too slowly


def test_ttft_over_target_shortens_the_window_multiplicatively() -> None:
    controller = AdaptiveController(SETTINGS)
    run(controller, 4 * 20, itl=0.02, ttft=0.1, lag=500)
    periods, window, _, _ = until(controller, "ttft_over_target", itl=0.02, ttft=3.0)
    assert periods <= 2
    assert controller.window_s == pytest.approx(window / 2)


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
    assert run(controller, 4, itl=0.5, ttft=0.1, running=40) == ["itl_over_target_batch"]
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


def test_each_cut_is_judged_on_what_followed_it() -> None:
    # Decisions every 4 steps, but after a cut 16 fresh steps are observed first: slow
    # steps that already caused a cut do not cause the next one (cuts at steps 4, 20, 36, 52).
    controller = AdaptiveController(replace(SETTINGS, min_itl_samples=16))
    reasons = run(controller, 64, itl=0.5, ttft=0.1, running=64)
    assert reasons.count("itl_over_target_batch") == 4
    assert reasons.count("measuring") == 12
    assert controller.running_cap == 64 // 2 ** 4


def test_prefill_spikes_cut_admission_but_not_the_batch() -> None:
    controller = AdaptiveController(SETTINGS)
    admit = controller.admit_size
    # Gaps over target, but decoding alone is quick: prefills interrupt for too long.
    assert run(controller, 4, itl=0.5, ttft=0.1, running=40, decode=0.01) == [
        "itl_over_target"]
    assert controller.admit_size == admit // 2
    assert controller.running_cap == 64


def test_policy_admits_nothing_at_the_running_cap() -> None:
    controller = AdaptiveController(SETTINGS)
    controller.running_cap = 5
    capped = AdaptivePolicy(controller, max_batch_size=8, max_batch_tokens=100)
    assert capped.running_cap == 5
    assert capped.decide([5] * 6, 1.0, running=5) == BatchDecision(0, None)
    assert capped.decide([5] * 6, 1.0, running=3) == BatchDecision(2, None)


def test_without_inter_token_samples_it_still_decides_on_ttft() -> None:
    # One-token requests have no gaps between tokens: TTFT alone must still steer.
    controller = AdaptiveController(SETTINGS)
    controller.window_s = 0.05
    reasons = []
    for _ in range(4):
        controller.observe_step(None, [3.0])
        adjustment = controller.adjust()
        if adjustment is not None:
            reasons.append(adjustment.reason)
    assert reasons == ["ttft_over_target"]
    assert controller.window_s == pytest.approx(0.025)


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
