"""Ray Serve's autoscaling policy, as a pure function of the load seen so far.

The load of a deployment is a series of :class:`LoadSample`: requests ongoing
at its replicas plus requests queued at its callers, sampled over time.
:func:`autoscale` reads that series and says whether to change the target
replica count now:

* ``desired = ceil(running * (1 + (total / (target_ongoing * running) - 1) * factor))``
  where ``total`` is the load aggregated (mean by default) over
  ``look_back_period_s`` and ``factor`` is the upscaling or downscaling factor;
  clipped to ``[min_replicas, max_replicas]``;
* a change is made only when every evaluation within the last
  ``upscale_delay_s`` (or ``downscale_delay_s``; ``downscale_to_zero_delay_s``
  for 1 -> 0) agreed on the direction, and at least that long after the last
  change - the pure form of Ray Serve's consecutive-decision counter;
* from zero replicas, the first request scales up at once.

The decision's ``evidence`` holds the samples it used, so re-running the
policy on the evidence gives the same decision: the event log can check it.
This module is pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from trioserve.core.config import AutoscalingConfig

__all__ = [
    "LoadSample",
    "ScaleChoice",
    "autoscale",
    "desired_replicas",
    "samples_from_evidence",
]


@dataclasses.dataclass(frozen=True)
class LoadSample:
    """The load on a deployment at one moment."""

    at: float
    ongoing: float
    """Requests being processed by its replicas."""
    queued: float = 0.0
    """Requests waiting at callers (handles, the proxy) for a replica."""

    @property
    def total(self) -> float:
        return self.ongoing + self.queued


@dataclasses.dataclass(frozen=True)
class ScaleChoice:
    """What :func:`autoscale` decided: move the target to ``to_replicas``."""

    to_replicas: int
    reason: str
    evidence: dict[str, Any]


def desired_replicas(config: AutoscalingConfig, total: float, running: int) -> int:
    """The replica count the load asks for, after gain and bounds (no delays).

    ``running`` must be positive; see :func:`autoscale` for scaling from zero.
    """
    if running <= 0:
        raise ValueError("running must be positive")
    error_ratio = total / (config.target_ongoing_requests * running)
    raw = running * error_ratio
    delta = raw - running
    factor = config.upscale_factor if delta > 0 else config.downscale_factor
    scaled = math.ceil(running + factor * delta)
    # A small downscaling factor must not leave the count stuck just above
    # what the load asks for: take at least one step down.
    if math.ceil(raw) < running and scaled == running:
        scaled -= 1
    return max(config.min_replicas, min(config.max_replicas, scaled))


def _aggregate(config: AutoscalingConfig, values: Sequence[float]) -> float:
    if config.aggregation_function == "max":
        return max(values)
    if config.aggregation_function == "min":
        return min(values)
    return sum(values) / len(values)


class _Series:
    """Samples sorted by time, answering "aggregated load at time t".

    The load at ``t`` aggregates the samples in ``(t - look_back_period_s, t]``
    and nothing else (so it is the same whichever older samples are known).
    """

    def __init__(self, config: AutoscalingConfig, samples: Sequence[LoadSample]) -> None:
        self.config = config
        self.times = [s.at for s in samples]
        self.totals = [s.total for s in samples]

    def load_at(self, t: float) -> float | None:
        lo = bisect.bisect_right(self.times, t - self.config.look_back_period_s)
        hi = bisect.bisect_right(self.times, t)
        if hi <= lo:
            return None
        values = self.totals[lo:hi]
        if self.config.aggregation_function == "mean":
            return math.fsum(values) / len(values)
        return _aggregate(self.config, values)


def autoscale(
    config: AutoscalingConfig,
    *,
    target: int,
    running: int,
    samples: Sequence[LoadSample],
    now: float,
    last_scale_at: float | None,
) -> ScaleChoice | None:
    """Decide whether the target replica count should change now.

    ``target`` is the current target, ``running`` the replicas serving,
    ``samples`` the load seen so far (any order, any length; only those in the
    last ``look_back_period_s`` + delay are read), ``last_scale_at`` when the
    target last changed. Returns ``None`` to keep the target.
    """
    if last_scale_at is not None and last_scale_at >= now:
        return None  # the target changes at most once per instant
    used = sorted((s for s in samples if s.at <= now), key=lambda s: s.at)
    if not used:
        return None
    latest = used[-1]

    if target == 0:
        if latest.total > 0:
            to = min(config.max_replicas, max(1, math.ceil(config.upscale_factor)))
            return ScaleChoice(
                to,
                f"scale from zero: {latest.total:g} request(s) waiting",
                _evidence(config, [latest], running, target, to, 0.0),
            )
        return None
    if running == 0:
        return None  # replicas are still starting; nothing to measure yet

    series = _Series(config, used)
    current = series.load_at(now)
    if current is None:
        return None
    desired = desired_replicas(config, current, running)
    if desired == target:
        return None
    if desired > target:
        delay = config.upscale_delay_s
        direction = "up"
    else:
        if target == 1 and desired == 0 and config.downscale_to_zero_delay_s is not None:
            delay = config.downscale_to_zero_delay_s
        else:
            delay = config.downscale_delay_s
        if target > 1:
            desired = max(1, desired)
        direction = "down"

    start = now - delay
    if last_scale_at is not None and last_scale_at > start:
        return None  # the delay counts from the last change
    # Agreement: the load is piecewise constant between the moments a sample
    # enters or leaves the look-back; evaluated at each such moment in the
    # delay window (and at its start and now), the policy must have wanted to
    # move in the same direction all along.
    covering = [s for s in used if s.at <= start]
    if not covering:
        return None  # not observed for long enough yet
    window = [s for s in used if s.at > start - config.look_back_period_s]
    if covering[-1] not in window:
        window.insert(0, covering[-1])  # kept in the evidence to show coverage
    look_back = config.look_back_period_s
    moments = {start, now}
    for s in window:
        for t in (s.at, s.at + look_back):
            if start <= t <= now:
                moments.add(t)
    for t in sorted(moments):
        load = series.load_at(t)
        if load is None:
            return None
        d = desired_replicas(config, load, running)
        if (direction == "up" and d <= target) or (direction == "down" and d >= target):
            return None
    reason = (
        f"{direction}scale: {config.aggregation_function} load {current:g} over "
        f"{config.look_back_period_s:g}s on {running} running replica(s), target "
        f"{config.target_ongoing_requests:g} per replica, agreed for {delay:g}s"
    )
    return ScaleChoice(desired, reason, _evidence(config, window, running, target, desired, delay))


def _evidence(
    config: AutoscalingConfig,
    samples: Sequence[LoadSample],
    running: int,
    target: int,
    desired: int,
    delay: float,
) -> dict[str, Any]:
    return {
        "samples": [[s.at, s.ongoing, s.queued] for s in samples],
        "running": running,
        "target": target,
        "desired": desired,
        "delay_s": delay,
        "look_back_period_s": config.look_back_period_s,
        "target_ongoing_requests": config.target_ongoing_requests,
    }


def samples_from_evidence(evidence: Mapping[str, Any]) -> list[LoadSample]:
    """The load samples an autoscaling decision recorded, to re-run it."""
    return [LoadSample(float(a), float(o), float(q)) for a, o, q in evidence["samples"]]
