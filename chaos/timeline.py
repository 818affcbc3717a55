"""A scenario's timeline and report: what chaos did (actions), what it saw the mesh do
(observations), each with its time since the scenario began; the expectations it checked
and the saga's invariants afterwards. Pure bookkeeping plus printing; no mesh I/O.

The report (``--report FILE``) is JSON::

    {"scenario": "trip-breaker", "passed": true, "seed": 7, "short": true,
     "started_at_unix": 1700000000.0, "duration_s": 12.3,
     "steps": [{"t": 0.41, "kind": "action", "detail": "payment-1: fail every call ..."},
               {"t": 1.93, "kind": "observation", "detail": "breaker OPEN ..."}],
     "expectations": {"breaker opened on every caller": true, ...},
     "invariants": {"no order in flight": true, ...},
     "measurements": {"order_success_rate_after": 0.98, ...}}

``passed`` is true iff every expectation and every invariant holds and at least one
invariant was checked.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ACTION = "action"
OBSERVATION = "observation"


@dataclass
class Step:
    t: float
    """Seconds since the scenario began."""
    kind: str
    """``action`` (what chaos broke or healed) or ``observation`` (what the mesh did)."""
    detail: str


@dataclass
class Timeline:
    """Collects a scenario's steps, expectations, invariants and measurements, printing each
    step as it happens (``out``; None = silent)."""

    scenario: str
    seed: int = 0
    short: bool = False
    out: TextIO | None = field(default=sys.stdout, repr=False)
    clock: Callable[[], float] = time.monotonic
    steps: list[Step] = field(default_factory=list)
    expectations: dict[str, bool] = field(default_factory=dict)
    invariants: dict[str, bool] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    started_at_unix: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._t0 = self.clock()
        self._ended: float | None = None

    @property
    def t(self) -> float:
        """Seconds since the scenario began."""
        return self.clock() - self._t0

    def _print(self, tag: str, text: str) -> None:
        if self.out is not None:
            self.out.write(f"[{self.t:7.2f}s] {tag:<7} {text}\n")
            self.out.flush()

    def action(self, detail: str) -> None:
        """Something chaos did to the mesh."""
        self.steps.append(Step(round(self.t, 3), ACTION, detail))
        self._print("ACTION", detail)

    def observe(self, detail: str) -> None:
        """Something the mesh did (or a figure chaos measured)."""
        self.steps.append(Step(round(self.t, 3), OBSERVATION, detail))
        self._print("SAW", detail)

    def say(self, text: str) -> None:
        """A line for the reader only (not a step of the report)."""
        self._print("", text)

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record expectation ``name`` (an observation step says how it went); returns ok.
        A name checked twice holds only if it held both times."""
        self.expectations[name] = self.expectations.get(name, True) and bool(ok)
        verdict = "PASS" if ok else "FAIL"
        self.steps.append(Step(round(self.t, 3), OBSERVATION,
                               f"expectation {verdict}: {name}" + (f" ({detail})" if detail else "")))
        self._print(verdict, name + (f": {detail}" if detail else ""))
        return bool(ok)

    def measure(self, key: str, value: Any) -> None:
        self.measurements[key] = value

    def invariant(self, name: str, ok: bool) -> None:
        self.invariants[name] = bool(ok)
        self._print("HOLDS" if ok else "BROKEN", f"invariant: {name}")

    def end(self) -> None:
        if self._ended is None:
            self._ended = self.t

    @property
    def passed(self) -> bool:
        return (bool(self.invariants) and all(self.expectations.values())
                and all(self.invariants.values()))

    def report(self) -> dict[str, Any]:
        self.end()
        return {"scenario": self.scenario, "passed": self.passed, "seed": self.seed,
                "short": self.short, "started_at_unix": self.started_at_unix,
                "duration_s": round(self._ended or 0.0, 3),
                "steps": [{"t": s.t, "kind": s.kind, "detail": s.detail} for s in self.steps],
                "expectations": dict(self.expectations), "invariants": dict(self.invariants),
                "measurements": dict(self.measurements)}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2) + "\n")
