"""Hypothesis profiles for the simulations.

* ``ci`` (chosen when ``CI`` is set): a fixed, derandomized budget, no deadline;
* ``dev`` (the default): a quick randomized run;
* ``long`` (``make sim``, or ``HYPOTHESIS_PROFILE=long``): many more scenarios.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", derandomize=True, max_examples=100, stateful_step_count=30, **_common
)
settings.register_profile("dev", max_examples=50, stateful_step_count=30, **_common)
settings.register_profile("long", max_examples=1000, stateful_step_count=60, **_common)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)
