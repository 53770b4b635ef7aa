"""Ray Serve's autoscaling policy as a pure function: what count it asks for, and when."""

from __future__ import annotations

import random
from typing import Any

import pytest

from trioserve.core.autoscaling import (
    LoadSample,
    ScaleChoice,
    autoscale,
    desired_replicas,
    samples_from_evidence,
)
from trioserve.core.config import AutoscalingConfig


def config(**overrides: Any) -> AutoscalingConfig:
    """Small timings: one sample a second, and a look-back of one sample."""
    fields: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 2,
        "metrics_interval_s": 1,
        "look_back_period_s": 1,
        "upscale_delay_s": 3,
        "downscale_delay_s": 6,
    }
    fields.update(overrides)
    return AutoscalingConfig(**fields)


def every_second(start: int, end: int, ongoing: float, queued: float = 0.0) -> list[LoadSample]:
    """One sample a second for t in [start, end]."""
    return [LoadSample(float(t), ongoing, queued) for t in range(start, end + 1)]


def decide_at(
    cfg: AutoscalingConfig,
    samples: list[LoadSample],
    now: float,
    *,
    target: int,
    running: int | None = None,
    last_scale_at: float | None = None,
) -> ScaleChoice | None:
    return autoscale(
        cfg,
        target=target,
        running=target if running is None else running,
        samples=samples,
        now=now,
        last_scale_at=last_scale_at,
    )


def to(choice: ScaleChoice | None) -> int | None:
    return None if choice is None else choice.to_replicas


# Calm (2 requests: one replica's worth) until t=9, then a burst of 6 ongoing + 4
# queued (10 requests: five replicas' worth) from t=10.
BURST = every_second(0, 9, 2.0) + every_second(10, 30, 6.0, 4.0)


# --------------------------------------------------------------------- the formula


def test_desired_is_load_over_target_per_replica_rounded_up() -> None:
    cfg = config(max_replicas=10)

    assert desired_replicas(cfg, total=7, running=2) == 4
    assert desired_replicas(cfg, total=4, running=2) == 2
    assert desired_replicas(cfg, total=4.5, running=1) == 3
    assert desired_replicas(cfg, total=12, running=3) == 6


def test_desired_is_clipped_to_min_and_max_replicas() -> None:
    cfg = config(min_replicas=2, max_replicas=4)

    assert desired_replicas(cfg, total=0, running=3) == 2
    assert desired_replicas(cfg, total=100, running=3) == 4
    assert desired_replicas(config(min_replicas=0), total=0, running=3) == 0


def test_upscaling_factor_damps_the_step_up() -> None:
    # The load asks for 6 replicas from 2; half the gain gives 2 + (6 - 2) / 2.
    assert desired_replicas(config(upscaling_factor=0.5), total=12, running=2) == 4
    assert desired_replicas(config(upscaling_factor=2), total=6, running=2) == 4
    # The downscaling factor plays no part in a step up.
    assert desired_replicas(config(downscaling_factor=0.1), total=12, running=2) == 6


def test_downscaling_factor_damps_the_step_down() -> None:
    # The load asks for 2 replicas from 8; half the gain gives ceil(8 - 3).
    assert desired_replicas(config(downscaling_factor=0.5), total=4, running=8) == 5
    assert desired_replicas(config(upscaling_factor=0.1), total=4, running=8) == 2


def test_small_downscaling_factor_still_takes_at_least_one_step_down() -> None:
    # ceil(4 + 0.1 * (2 - 4)) is 4 again: without the rule the count would never move.
    cfg = config(downscaling_factor=0.1)

    assert desired_replicas(cfg, total=4, running=4) == 3
    # ...but no step when the load does not ask for fewer replicas.
    assert desired_replicas(cfg, total=7, running=4) == 4


def test_older_smoothing_factor_names_still_apply() -> None:
    assert desired_replicas(config(upscale_smoothing_factor=0.5), total=12, running=2) == 4
    assert desired_replicas(config(smoothing_factor=0.5), total=12, running=2) == 4
    assert desired_replicas(config(downscale_smoothing_factor=0.5), total=4, running=8) == 5


def test_desired_needs_running_replicas() -> None:
    with pytest.raises(ValueError, match="running must be positive"):
        desired_replicas(config(), total=3, running=0)


# ------------------------------------------------------------------------ load window


def test_load_is_the_mean_over_the_look_back_period() -> None:
    cfg = config(look_back_period_s=3, upscale_delay_s=0)
    # The old spike at t=0 is out of the window (6, 9]: the mean of 2, 4, 6 is 4.
    samples = [LoadSample(0, 100), LoadSample(7, 1, 1), LoadSample(8, 3, 1), LoadSample(9, 4, 2)]

    choice = decide_at(cfg, samples, 9, target=1)

    assert to(choice) == 2
    assert choice is not None and "mean load 4" in choice.reason


@pytest.mark.parametrize(("function", "expected"), [("max", 3), ("mean", 2), ("min", None)])
def test_aggregation_function_picks_how_the_window_is_summed_up(
    function: str, expected: int | None
) -> None:
    cfg = config(look_back_period_s=3, upscale_delay_s=0, aggregation_function=function)
    samples = [LoadSample(7, 2), LoadSample(8, 4), LoadSample(9, 6)]

    assert to(decide_at(cfg, samples, 9, target=1)) == expected


def test_no_decision_without_a_sample_in_the_look_back_period() -> None:
    samples = every_second(0, 5, 6.0, 4.0)

    assert decide_at(config(), samples, 20, target=1) is None


def test_samples_after_now_are_ignored() -> None:
    cfg = config()
    calm = every_second(0, 20, 2.0)

    # A calm sample after now does not break the agreement of the burst...
    assert to(decide_at(cfg, [*BURST[:14], LoadSample(13.5, 0.0)], 13, target=1)) == 5
    # ...and a burst after now does not count yet.
    assert decide_at(config(upscale_delay_s=0), [*calm, LoadSample(21, 50.0)], 20, target=1) is None


def test_samples_may_arrive_in_any_order() -> None:
    shuffled = list(BURST)
    random.Random(7).shuffle(shuffled)

    assert decide_at(config(), shuffled, 13, target=1) == decide_at(config(), BURST, 13, target=1)


# ------------------------------------------------------------------------ upscaling


def test_upscale_waits_for_upscale_delay_of_agreement() -> None:
    cfg = config()

    assert decide_at(cfg, BURST, 10, target=1) is None
    assert decide_at(cfg, BURST, 12, target=1) is None
    choice = decide_at(cfg, BURST, 13, target=1)

    assert to(choice) == 5
    assert choice is not None and choice.reason.startswith("upscale")
    assert "agreed for 3s" in choice.reason


def test_a_dip_in_load_restarts_the_upscale_delay() -> None:
    dip = every_second(0, 9, 2.0) + every_second(10, 11, 10.0)
    dip += [LoadSample(12, 2.0), *every_second(13, 30, 10.0)]
    cfg = config()

    assert decide_at(cfg, dip, 13, target=1) is None
    assert decide_at(cfg, dip, 15, target=1) is None
    assert to(decide_at(cfg, dip, 16, target=1)) == 5


def test_upscale_needs_load_observed_for_the_whole_delay() -> None:
    # No sample before t=10: the policy cannot know the load agreed since t=9.5.
    samples = every_second(10, 20, 10.0)

    assert decide_at(config(), samples, 12.5, target=1) is None
    assert to(decide_at(config(), samples, 13, target=1)) == 5


def test_upscale_is_capped_at_max_replicas() -> None:
    assert to(decide_at(config(max_replicas=3), BURST, 13, target=1)) == 3
    assert decide_at(config(max_replicas=3), BURST, 20, target=3) is None


def test_upscale_measures_load_per_running_replica_not_per_target() -> None:
    # Target 4 but only 1 replica serves: 10 requests ask for 5 from 1 running.
    assert to(decide_at(config(), BURST, 13, target=4, running=1)) == 5


def test_no_decision_while_the_load_asks_for_the_current_target() -> None:
    assert decide_at(config(), BURST, 25, target=5) is None
    assert decide_at(config(), every_second(0, 30, 4.0), 25, target=2) is None


def test_no_decision_while_replicas_are_still_starting() -> None:
    assert decide_at(config(), BURST, 25, target=2, running=0) is None


# ---------------------------------------------------------------------- downscaling


# Five replicas' worth of load until t=9, then one replica's worth from t=10.
LULL = every_second(0, 9, 10.0) + every_second(10, 30, 2.0)


def test_downscale_waits_for_downscale_delay_of_agreement() -> None:
    cfg = config()

    assert decide_at(cfg, LULL, 13, target=5) is None
    assert decide_at(cfg, LULL, 15, target=5) is None
    choice = decide_at(cfg, LULL, 16, target=5)

    assert to(choice) == 1
    assert choice is not None and choice.reason.startswith("downscale")


def test_a_burst_restarts_the_downscale_delay() -> None:
    samples = [*LULL[:13], LoadSample(13, 10.0), *LULL[14:]]

    assert decide_at(config(), samples, 16, target=5) is None
    assert decide_at(config(), samples, 19, target=5) is None
    assert to(decide_at(config(), samples, 20, target=5)) == 1


def test_downscale_is_floored_at_min_replicas() -> None:
    assert to(decide_at(config(min_replicas=2), LULL, 16, target=5)) == 2


def test_target_above_max_replicas_comes_down_after_the_downscale_delay() -> None:
    # max_replicas was lowered to 3 under a target of 6; the load still asks for 5.
    cfg = config(max_replicas=3)
    samples = every_second(0, 30, 10.0)

    assert decide_at(cfg, samples, 5, target=6) is None
    assert to(decide_at(cfg, samples, 6, target=6)) == 3


# Load one replica can serve until t=9, then nothing from t=10.
IDLE = every_second(0, 9, 1.0) + every_second(10, 30, 0.0)


def test_downscale_to_zero_uses_its_own_delay() -> None:
    cfg = config(min_replicas=0, downscale_to_zero_delay_s=2)

    assert decide_at(cfg, IDLE, 11, target=1) is None
    choice = decide_at(cfg, IDLE, 12, target=1)

    assert to(choice) == 0
    assert choice is not None and choice.evidence["delay_s"] == 2


def test_downscale_to_zero_defaults_to_the_downscale_delay() -> None:
    cfg = config(min_replicas=0)

    assert decide_at(cfg, IDLE, 12, target=1) is None
    assert decide_at(cfg, IDLE, 15, target=1) is None
    assert to(decide_at(cfg, IDLE, 16, target=1)) == 0


def test_downscale_from_several_replicas_stops_at_one() -> None:
    cfg = config(min_replicas=0, downscale_to_zero_delay_s=2)
    samples = every_second(0, 9, 6.0) + every_second(10, 30, 0.0)

    # From 3 the to-zero delay does not apply, and the step ends at 1, not 0.
    assert decide_at(cfg, samples, 12, target=3) is None
    assert to(decide_at(cfg, samples, 16, target=3)) == 1
    # From 1, zero follows after the to-zero delay.
    assert decide_at(cfg, samples, 17, target=1, last_scale_at=16) is None
    assert to(decide_at(cfg, samples, 18, target=1, last_scale_at=16)) == 0


# --------------------------------------------------------------------- from zero


def test_scale_from_zero_is_immediate() -> None:
    cfg = config(min_replicas=0)
    samples = [*every_second(0, 19, 0.0), LoadSample(20, 0.0, 1.0)]

    # At once: no delay, and a change a moment ago does not hold it back.
    choice = decide_at(cfg, samples, 20, target=0, last_scale_at=19.5)

    assert to(choice) == 1
    assert choice is not None and "scale from zero" in choice.reason
    assert samples_from_evidence(choice.evidence) == [LoadSample(20, 0.0, 1.0)]


def test_scale_from_zero_applies_the_upscaling_factor_within_max() -> None:
    samples = [LoadSample(20, 0.0, 1.0)]

    assert to(decide_at(config(min_replicas=0, upscaling_factor=2.5), samples, 20, target=0)) == 3
    capped = config(min_replicas=0, max_replicas=2, upscaling_factor=2.5)
    assert to(decide_at(capped, samples, 20, target=0)) == 2


def test_no_scale_from_zero_without_requests() -> None:
    cfg = config(min_replicas=0)

    assert decide_at(cfg, every_second(0, 20, 0.0), 20, target=0) is None
    assert decide_at(cfg, [], 20, target=0) is None


# ----------------------------------------------------------------- change rate


def test_at_most_one_change_per_delay() -> None:
    # Target 2 was just raised from 1 at t=11; the burst now asks for 5.
    cfg = config()

    assert decide_at(cfg, BURST, 13, target=2, last_scale_at=11) is None
    assert to(decide_at(cfg, BURST, 14, target=2, last_scale_at=11)) == 5


def test_at_most_one_change_per_instant_even_without_delay() -> None:
    cfg = config(upscale_delay_s=0)

    assert decide_at(cfg, BURST, 12, target=2, last_scale_at=12) is None
    assert to(decide_at(cfg, BURST, 12, target=2, last_scale_at=11.5)) == 5


# ---------------------------------------------------------------------- evidence


def test_evidence_reproduces_the_decision() -> None:
    rng = random.Random(3)
    history = [LoadSample(float(t), float(rng.randint(0, 3))) for t in range(60)]
    burst = [LoadSample(float(t), float(rng.randint(9, 12)), 2.0) for t in range(60, 80)]
    cfg = config(look_back_period_s=3, upscale_delay_s=4, max_replicas=8)

    choice = decide_at(cfg, history + burst, 79, target=2)
    assert choice is not None

    again = decide_at(cfg, samples_from_evidence(choice.evidence), 79, target=2)
    assert again == choice
    assert len(choice.evidence["samples"]) < len(history + burst)
    assert choice.evidence["running"] == 2
    assert choice.evidence["target"] == 2
    assert choice.evidence["desired"] == choice.to_replicas
    assert choice.evidence["delay_s"] == 4
    assert choice.evidence["look_back_period_s"] == 3
    assert choice.evidence["target_ongoing_requests"] == 2


def test_evidence_holds_the_look_back_before_the_delay_window() -> None:
    # The agreement at t=77 (start of the delay) rests on the samples of (74, 77]:
    # a lone quiet second at 77 is averaged with the busy ones before it.
    loads = {75: 20.0, 76: 20.0, 77: 1.0, 78: 20.0, 79: 20.0}
    samples = [LoadSample(float(t), loads.get(t, 0.0)) for t in range(60, 80)]
    cfg = config(look_back_period_s=3, upscale_delay_s=2, max_replicas=8)

    choice = decide_at(cfg, samples, 79, target=2)
    assert to(choice) == 7
    assert choice is not None

    assert samples_from_evidence(choice.evidence) == samples[-5:]  # t = 75 .. 79
    assert decide_at(cfg, samples_from_evidence(choice.evidence), 79, target=2) == choice


def test_evidence_of_a_downscale_reproduces_it() -> None:
    cfg = config(look_back_period_s=2)

    choice = decide_at(cfg, LULL, 20, target=5)
    assert choice is not None

    assert decide_at(cfg, samples_from_evidence(choice.evidence), 20, target=5) == choice


# ------------------------------------------------------------------- regressions


# Regression test; the bug was: autoscale evaluates agreement only at sample times >= now - delay,
# not at the window start itself: the load from the last sample before the window (which
# disagreed) is ignored, so an upscale with upscale_delay_s=3 fires 2.5s after the burst when now
# falls between samples.
def test_upscale_agreement_covers_the_start_of_the_delay_window() -> None:
    # The burst was first seen at t=10; at t=9.5 the policy still saw calm.
    assert decide_at(config(), BURST, 9.5, target=1, running=1) is None

    assert decide_at(config(), BURST, 12.5, target=1) is None


# Regression test; the bug was: autoscale evaluates agreement only when a sample arrives, not when
# one leaves the look-back window: with look_back 10, samples (0, 100), (9, 0), (12, 100), the
# load during [10, 12) is 0 (the policy wants fewer replicas) yet an upscale with
# upscale_delay_s=12 is made at t=12.
def test_upscale_agreement_counts_moments_when_a_sample_leaves_the_look_back() -> None:
    cfg = config(max_replicas=5, look_back_period_s=10, upscale_delay_s=12)
    samples = [LoadSample(0, 100), LoadSample(9, 0), LoadSample(12, 100)]
    # At t=11 the window (1, 11] holds only the idle sample: no upscale is wanted.
    assert (
        decide_at(config(look_back_period_s=10, upscale_delay_s=0), samples, 11, target=1) is None
    )

    assert decide_at(cfg, samples, 12, target=1) is None


# Averaged ongoing counts of 1.4 until t=3, then exactly 2.0 from t=4.
FRACTIONAL = every_second(0, 3, 1.4) + every_second(4, 9, 2.0)


# Regression test; the bug was: _Series.load_at computes the mean as a difference of running
# prefix sums over all samples: samples outside the look-back change it by rounding, so a window
# of exactly 2.0 requests reads as 2.0000000000000004 and ceil() asks for 3 replicas instead of 2.
def test_mean_load_does_not_depend_on_samples_outside_the_look_back() -> None:
    cfg = config(target_ongoing_requests=1, look_back_period_s=2, upscale_delay_s=2)

    assert to(decide_at(cfg, FRACTIONAL, 9, target=1)) == 2


# Regression test; the bug was: the prefix-sum mean depends on samples dropped from the evidence,
# so re-running the policy on the evidence gives to_replicas=2 where the decision said 3
# (trioserve log verify then flags a genuine AutoscaleDecision).
def test_evidence_reproduces_a_decision_on_fractional_load() -> None:
    cfg = config(target_ongoing_requests=1, look_back_period_s=2, upscale_delay_s=2)
    choice = decide_at(cfg, FRACTIONAL, 9, target=1)
    assert choice is not None

    assert decide_at(cfg, samples_from_evidence(choice.evidence), 9, target=1) == choice


# Regression test; the bug was: scale from zero ignores last_scale_at: after a 1 -> 0 decision at
# t=10 (made with downscaling_factor=2 while 0.5 requests are in flight), autoscale at the same
# instant from target 0 moves straight back to 1, two changes in one instant.
def test_scale_from_zero_does_not_undo_a_change_made_at_the_same_instant() -> None:
    cfg = config(
        min_replicas=0,
        max_replicas=3,
        look_back_period_s=10,
        downscale_delay_s=5,
        downscale_to_zero_delay_s=5,
        downscaling_factor=2,
    )
    samples = every_second(0, 10, 0.5)
    assert to(decide_at(cfg, samples, 10, target=1)) == 0

    assert decide_at(cfg, samples, 10, target=0, running=0, last_scale_at=10) is None
