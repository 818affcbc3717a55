"""``storm``: the other scenarios one after another, in an order drawn from ``--seed``, for
a bounded time; each heals what it broke before the next begins.

``--short`` runs two or three of them (about a minute at most); the full run goes through
shuffled rounds of every scenario until its time is up (a few minutes). Each sub-scenario
runs its own ``run`` with its own expectations, recorded prefixed with its name
(``"cert-rotation: zero failed calls at the load generator"``); its timeline steps are
prefixed ``[name]``. Between two sub-scenarios the storm checks what each promises to leave
behind: every process of state.json running and every sidecar SYNCED (``NAME: left the mesh
healthy``). The runner audits the saga's invariants once, at the end.

A scenario whose module does not exist (yet) is left out of the draw, and said so.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from chaos.mesh import ChaosError, Mesh, wait_for
from chaos.scenarios import SCENARIOS, STANDARD, Options, load
from chaos.timeline import Timeline

NAME = "storm"
EXPECTATION = ("the other scenarios in an order drawn from the seed, for a bounded time, each "
               "healed before the next: every one's own expectations hold, and the mesh is "
               "healthy after each")

SHORT_BUDGET_S = 40.0
"""--short: no sub-scenario starts after this many seconds (two or three run, about a minute in all)."""
FULL_BUDGET_S = 180.0
"""Full run: no sub-scenario starts after this many seconds."""
HEALTHY_BOUND_S = 30.0
"""Every process running and every sidecar SYNCED within this after a sub-scenario."""


@dataclass
class SubTimeline:
    """A view of the storm's timeline for one sub-scenario: its steps go on the storm's
    timeline prefixed ``[label]``, its expectations prefixed ``name: `` (a scenario run
    twice holds only if it held both times) and its measurements ``label: ``."""

    parent: Timeline
    name: str
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def t(self) -> float:
        return self.parent.t

    @property
    def short(self) -> bool:
        return self.parent.short

    @property
    def seed(self) -> int:
        return self.parent.seed

    def action(self, detail: str) -> None:
        self.parent.action(f"[{self.label}] {detail}")

    def observe(self, detail: str) -> None:
        self.parent.observe(f"[{self.label}] {detail}")

    def say(self, text: str) -> None:
        self.parent.say(f"[{self.label}] {text}")

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        return self.parent.expect(f"{self.name}: {name}", ok, detail)

    def measure(self, key: str, value: Any) -> None:
        self.parent.measure(f"{self.label}: {key}", value)

    def invariant(self, name: str, ok: bool) -> None:
        self.parent.invariant(f"{self.name}: {name}", ok)

    def __getattr__(self, attr: str) -> Any:
        """Anything else a scenario reads (the clock, the report so far) is the storm's."""
        if attr.startswith("__") or attr == "parent":
            raise AttributeError(attr)
        return getattr(self.parent, attr)


def available() -> dict[str, ModuleType]:
    """The standard scenarios whose modules exist, by name (storm itself never)."""
    out: dict[str, ModuleType] = {}
    for name in STANDARD:
        if name == NAME:
            continue
        try:
            out[name] = load(name)
        except ModuleNotFoundError as exc:
            if exc.name != SCENARIOS[name]:   # the module exists but is broken: say so
                raise
    return out


def draw(names: list[str], rng: random.Random, short: bool) -> list[str]:
    """The order to run ``names`` in: ``short``, two or three of one shuffle; else shuffled
    rounds of all of them (the budget ends the list), no name twice in a row."""
    if short:
        order = list(names)
        rng.shuffle(order)
        return order[:min(len(order), rng.choice((2, 3)))]
    out: list[str] = []
    for _ in range(20):
        order = list(names)
        rng.shuffle(order)
        if out and len(order) > 1 and order[0] == out[-1]:
            order.append(order.pop(0))
        out += order
    return out


def healthy(mesh: Mesh) -> tuple[bool, str]:
    """(every process of state.json running and every sidecar SYNCED, what is not)."""
    mesh.reload()
    dead = [p.instance or p.role for p in mesh.state.processes if not mesh.alive(p)]
    if dead:
        return False, f"not running: {', '.join(dead)}"
    try:
        if not mesh.all_synced():
            bad = [f"{s.instance} {s.state}{'' if s.connected else ' (down)'}"
                   for s in mesh.sidecars() if not (s.connected and s.state == "SYNCED")]
            return False, f"not SYNCED: {', '.join(bad) or 'some sidecar not registered'}"
    except Exception as exc:   # the control plane not answering
        return False, f"control plane: {type(exc).__name__}: {exc}"
    return True, ""


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Run the drawn sub-scenarios one after another (see the module doc)."""
    modules = available()
    missing = [n for n in STANDARD if n != NAME and n not in modules]
    if missing:
        tl.say(f"left out (no module yet): {', '.join(missing)}")
    if len(modules) < 2:
        raise ChaosError(f"a storm needs at least two scenarios; found {sorted(modules)}")
    budget = opts.pick(SHORT_BUDGET_S, FULL_BUDGET_S)
    order = draw(sorted(modules), opts.rng, opts.short)
    tl.say(f"storm: no scenario starts after {budget:g}s; order: "
           + (", ".join(order) if opts.short else ", ".join(order[:len(modules)]) + ", ..."))
    t0 = time.monotonic()
    ran: list[str] = []
    for i, name in enumerate(order):
        if len(ran) >= 2 and time.monotonic() - t0 >= budget:
            break
        label = name if name not in ran else f"{name} #{ran.count(name) + 1}"
        sub_tl = SubTimeline(tl, name, label)
        sub_opts = Options(short=opts.short, seed=opts.seed * 1000 + i,
                           rng=random.Random(opts.rng.random()))
        tl.action(f"storm {i + 1}: {label} ({modules[name].EXPECTATION})")
        started = time.monotonic()
        try:
            modules[name].run(mesh, sub_tl, sub_opts)  # type: ignore[arg-type]
            ok, why = True, ""
        except ChaosError as exc:
            ok, why = False, str(exc)
        except Exception as exc:   # a bug in a sub-scenario: recorded, the storm goes on
            ok, why = False, f"{type(exc).__name__}: {exc}"
        sub_tl.expect("ran to its end", ok, why)
        ran.append(name)
        tl.measure(f"{label}: duration_s", round(time.monotonic() - started, 2))
        whole = wait_for(lambda: healthy(mesh)[0], HEALTHY_BOUND_S, poll_s=0.5)
        why = "" if whole else healthy(mesh)[1]
        sub_tl.expect("left the mesh healthy", bool(whole),
                      "every process running, every sidecar SYNCED" if whole else why)
        if not whole:
            tl.observe("the mesh is not healthy: the storm stops here")
            break
    tl.measure("storm_scenarios", ran)
    tl.measure("storm_duration_s", round(time.monotonic() - t0, 2))
    tl.expect("storm ran at least two scenarios", len(ran) >= 2,
              f"{len(ran)} in {time.monotonic() - t0:.0f}s: {', '.join(ran)}")
