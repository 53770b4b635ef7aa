"""Rule-based scenarios: the controller under deploys, updates, load and faults.

hypothesis chooses the steps (deploy, update, delete, change load, crash,
hang, slow drain, restart the controller, let time pass); after every step the
safety invariants hold (:meth:`World.check_safety`), and when the scenario
ends, faults stop and the world must converge (:meth:`World.settle`). A
failing run prints the world's seed and hypothesis's shortest failing list of
steps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from simulations.world import BAD_VERSION, HANGING_VERSION, World, sim_config

APPS = ("shop", "search")
VERSIONS = ("v1", "v2", "v3", BAD_VERSION, HANGING_VERSION)


class ControllerScenario(RuleBasedStateMachine):
    world: World

    @initialize(seed=st.integers(min_value=0, max_value=2**32 - 1))
    def start(self, seed: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="trioserve-sim-")
        self.world = World(seed, Path(self._tmp.name) / "events.db")
        note(f"world seed: {seed}")

    @rule(
        app=st.sampled_from(APPS),
        version=st.sampled_from(VERSIONS),
        replicas=st.integers(min_value=1, max_value=5),
        autoscaling=st.booleans(),
        min_replicas=st.integers(min_value=0, max_value=2),
        user_config=st.sampled_from([None, {"threshold": 1}, {"threshold": 2}]),
        with_second=st.booleans(),
    )
    def deploy(
        self,
        app: str,
        version: str,
        replicas: int,
        autoscaling: bool,
        min_replicas: int,
        user_config: object,
        with_second: bool,
    ) -> None:
        ingress = sim_config(
            replicas,
            autoscaling=autoscaling,
            min_replicas=min_replicas,
            user_config=user_config,
        )
        deployments = [("Ingress", version, ingress)]
        if with_second:
            deployments.append(("Model", "m1", sim_config(2)))
        self.world.deploy(app, deployments)

    @rule(app=st.sampled_from(APPS))
    def delete(self, app: str) -> None:
        self.world.delete(app)

    @rule(app=st.sampled_from(APPS), in_flight=st.sampled_from([0, 1, 4, 12, 30]))
    def change_load(self, app: str, in_flight: int) -> None:
        self.world.set_load(app, "Ingress", in_flight)

    @rule(index=st.integers(min_value=0, max_value=50))
    def crash(self, index: int) -> None:
        note(f"crashed {self.world.crash(index)}")

    @rule(index=st.integers(min_value=0, max_value=50))
    def hang(self, index: int) -> None:
        note(f"hung {self.world.hang(index)}")

    @rule(index=st.integers(min_value=0, max_value=50))
    def slow_drain(self, index: int) -> None:
        note(f"slow drain {self.world.slow_drain(index)}")

    @rule()
    def restart_controller(self) -> None:
        self.world.restart_controller()

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0, 40.0]))
    def advance(self, seconds: float) -> None:
        self.world.advance(seconds)

    @invariant()
    @precondition(lambda self: hasattr(self, "world"))
    def safety(self) -> None:
        self.world.check_safety()

    def teardown(self) -> None:
        if hasattr(self, "world"):
            try:
                self.world.settle()
            finally:
                self.world.close()
                self._tmp.cleanup()


TestControllerScenario = ControllerScenario.TestCase
