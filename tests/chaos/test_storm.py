"""``storm``: sub-scenarios drawn from the seed, each with its own expectations recorded
under its name; plus the pure parts (the draw, the prefixing timeline) without a demo."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

from chaos.scenarios import storm
from chaos.timeline import Timeline
from tests.chaos.conftest import assert_passed, expectation

Report = dict[str, Any]
NAMES = ["a", "b", "c", "d"]


def test_short_draw_is_two_or_three_distinct_scenarios_fixed_by_the_seed() -> None:
    for seed in range(20):
        order = storm.draw(NAMES, random.Random(seed), short=True)
        assert 2 <= len(order) <= 3 and len(set(order)) == len(order)
        assert order == storm.draw(NAMES, random.Random(seed), short=True)
    assert len({tuple(storm.draw(NAMES, random.Random(s), True)) for s in range(20)}) > 1


def test_full_draw_is_rounds_of_every_scenario_never_twice_in_a_row() -> None:
    order = storm.draw(NAMES, random.Random(3), short=False)
    assert len(order) >= 5 * len(NAMES)
    for i in range(0, len(order), len(NAMES)):
        assert sorted(order[i:i + len(NAMES)]) == NAMES
    assert all(a != b for a, b in zip(order, order[1:], strict=False))


def test_sub_timeline_prefixes_steps_expectations_and_measurements() -> None:
    tl = Timeline("storm", out=io.StringIO())
    sub = storm.SubTimeline(tl, "cert-rotation", "cert-rotation #2")
    sub.action("renew")
    sub.observe("renewed")
    assert sub.expect("zero failed calls", True)
    sub.expect("zero failed calls", False, "1 failed")
    sub.measure("load_errors", 1)
    assert [s.detail for s in tl.steps][:2] == ["[cert-rotation #2] renew",
                                                "[cert-rotation #2] renewed"]
    assert tl.expectations == {"cert-rotation: zero failed calls": False}
    assert tl.measurements == {"cert-rotation #2: load_errors": 1}


def test_storm_runs_the_drawn_scenarios_each_with_its_own_expectations(
        scenario: Callable[..., Report]) -> None:
    # Seed 3 draws two scenarios (cert-rotation, kill-replica): the mechanism is the same for
    # every draw, and each scenario also has its own test; a three-scenario draw costs the
    # default suite another 20-30 s.
    report = scenario("storm", seed=3)
    ran = report["measurements"]["storm_scenarios"]
    assert 2 <= len(ran) <= 3, ran
    assert ran == storm.draw(sorted(storm.available()), random.Random(3), short=True)[:len(ran)]
    assert expectation(report, "storm ran at least two scenarios")
    for name in ran:
        assert expectation(report, f"{name}: ran to its end")
        assert expectation(report, f"{name}: left the mesh healthy")
        own = [k for k in report["expectations"] if k.startswith(f"{name}: ")
               and k not in (f"{name}: ran to its end", f"{name}: left the mesh healthy")]
        assert own, (name, sorted(report["expectations"]))
        assert all(expectation(report, k) for k in own)
        assert any(s["kind"] == "action" and s["detail"].startswith(f"[{name}]")
                   for s in report["steps"]), name
        assert any(s["kind"] == "action" and f": {name} (" in s["detail"]
                   for s in report["steps"]), name
    # sub-scenarios one after another, each begun once the previous one had healed
    starts = [s["t"] for s in report["steps"]
              if s["kind"] == "action" and s["detail"].startswith("storm ")]
    assert starts == sorted(starts) and len(starts) == len(ran)
    assert report["measurements"]["storm_duration_s"] <= storm.SHORT_BUDGET_S + 60
    assert_passed(report)
