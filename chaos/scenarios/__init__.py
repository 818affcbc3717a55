"""The scenarios, by name. Each is a module with ``NAME``, ``EXPECTATION`` (what must hold,
printed before it runs) and ``run(mesh, timeline, options)``: it breaks something, records
what it did and what the mesh did on the timeline, checks its expectations with
``timeline.expect`` and heals what it broke, leaving every process of state.json running
and every sidecar SYNCED. The runner then audits the saga's invariants.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from types import ModuleType

SCENARIOS: dict[str, str] = {
    "trip-breaker": "chaos.scenarios.trip_breaker",
    "slow-replica": "chaos.scenarios.slow_replica",
    "kill-replica": "chaos.scenarios.kill_replica",
    "control-plane-down": "chaos.scenarios.control_plane_down",
    "cert-rotation": "chaos.scenarios.cert_rotation",
    "orchestrator-crash": "chaos.scenarios.orchestrator_crash",
    "storm": "chaos.scenarios.storm",
}
"""Scenario name -> module."""

STANDARD: tuple[str, ...] = ("trip-breaker", "slow-replica", "kill-replica",
                             "control-plane-down", "cert-rotation", "orchestrator-crash")
"""What ``python -m chaos all`` (``make chaos``) runs, in this order."""


@dataclass(frozen=True)
class Options:
    """How a scenario runs: ``short`` (a few seconds of load per phase, for tests), the
    ``seed`` of its random choices and the generator seeded with it."""

    short: bool = False
    seed: int = 0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def pick(self, short: float, full: float) -> float:
        """``short`` when running short, else ``full`` (durations in s, counts)."""
        return short if self.short else full


def load(name: str) -> ModuleType:
    """The module of scenario ``name``; KeyError for an unknown name."""
    return importlib.import_module(SCENARIOS[name])
