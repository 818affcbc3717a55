"""Resilience with real processes: retries that mask a flaky replica (and leave a
non-idempotent method alone), the retry budget while every replica fails, outlier detection
that ejects a failing replica and lets it back through HALF_OPEN once healed (and never for a
business answer), circuit limits that fail fast, and ``meshctl breakers`` showing it all.

One mesh for the module (echo-1 and echo-2 with a controllable fail rate, callers web-1 and
web-2 without apps), reports every 0.5 s, small timers set through a TrafficPolicy. The tests
run in file order; each applies the policy it needs and leaves both replicas healthy.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from mesh_common.snapshot import outlier_doc, parse_limits, parse_outlier, parse_retries, retry_doc
from protos.mesh.v1 import control_pb2 as pb
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_control_plane import meshctl
from tests.integration.test_discovery import Mesh
from tests.support import procs

pytestmark = pytest.mark.timeout(240)

UNARY = "/meshtest.Echo/Unary"
SERVER_STREAM = "/meshtest.Echo/ServerStream"
REPLICAS = ("echo-1", "echo-2")
CALLERS = ("web-1", "web-2")
UNAVAILABLE, FAILED_PRECONDITION = 14, 9


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("resilience"))
    try:
        for name in REPLICAS:
            m.start("echo", name, app_args=("--control",))
        for name in CALLERS:
            m.start("web", name, app=False)
        procs.wait_for(lambda: m.all_synced({*REPLICAS, *CALLERS}), 20,
                       what="every sidecar SYNCED")
        yield m
    finally:
        m.close()


# ---------------------------------------------------------------------- helpers
def sicken(mesh: Mesh, replica: str, rate: float, code: int = UNAVAILABLE) -> None:
    """Make ``replica``'s echo server fail ``rate`` of its calls with ``code`` from now on."""
    port = mesh.apps[replica].ready["control"]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/fail?rate={rate}&code={code}",
                                 method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.load(r)["fail_rate"] == rate


def counts(mesh: Mesh, replica: str) -> dict[str, dict[str, int]]:
    """Echo calls ``replica``'s server received and failed by its rate, by method."""
    port = mesh.apps[replica].ready["control"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/counts", timeout=5) as r:
        return json.load(r)


def received(mesh: Mesh, replica: str, method: str = "Unary") -> int:
    return counts(mesh, replica)["calls"].get(method, 0)


def failed(mesh: Mesh, replica: str, method: str = "Unary") -> int:
    return counts(mesh, replica)["failed"].get(method, 0)


def held_route(mesh: Mesh, caller: str) -> dict[str, Any]:
    for r in mesh.held(caller)["snapshot"]["routes"]:
        if r["service"] == "echo":
            return r
    return {}


def apply_policy(mesh: Mesh, tmp_path: Path, **spec: Any) -> None:
    """Apply the TrafficPolicy ``echo`` with ``spec`` through meshctl and wait until both
    callers hold it (balancer, retries, limits and outlier detection as the snapshot writes
    them)."""
    doc = {"kind": "TrafficPolicy", "name": "echo", "spec": {"service": "echo", **spec}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = meshctl(mesh.cp, "apply", "-f", str(path))
    assert r.returncode == 0, r.stderr
    want = {"load_balancer": spec.get("load_balancer", "peak_ewma"),
            "retries": retry_doc(parse_retries(spec.get("retries"), "retries")),
            "limits": {k: getattr(parse_limits(spec.get("limits"), "limits"), k)
                       for k in ("max_connections", "max_pending", "max_requests",
                                 "max_retries")},
            "outlier_detection": outlier_doc(parse_outlier(spec.get("outlier_detection"),
                                                           "outlier_detection"))}
    for caller in CALLERS:
        procs.wait_for(lambda c=caller: all(held_route(mesh, c).get(k) == v
                                            for k, v in want.items()),
                       15, interval_s=0.2, what=f"the policy in {caller}'s snapshot")


def echo_stub(mesh: Mesh, caller: str = "web-1") -> tuple[grpc.Channel, echo_pb2_grpc.EchoStub]:
    ch = grpc.insecure_channel(mesh.sidecars[caller].ready["outbound"],
                               options=[("grpc.default_authority", "echo")])
    return ch, echo_pb2_grpc.EchoStub(ch)


def unary(stub: echo_pb2_grpc.EchoStub, sleep_ms: int = 0, timeout: float = 10
          ) -> tuple[grpc.StatusCode, str]:
    """(code, server_id or the status details) of one Unary call."""
    try:
        r = stub.Unary(echo_pb2.EchoRequest(payload=b"r", sleep_ms=sleep_ms), timeout=timeout)
        return grpc.StatusCode.OK, r.server_id
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]


def server_stream(stub: echo_pb2_grpc.EchoStub) -> tuple[grpc.StatusCode, str]:
    try:
        got = list(stub.ServerStream(echo_pb2.EchoRequest(payload=b"s", count=1), timeout=10))
        return grpc.StatusCode.OK, got[0].server_id
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]


def breakers(mesh: Mesh, service: str = "") -> pb.ListBreakersResponse:
    return mesh.admin().ListBreakers(pb.ListBreakersRequest(service=service), timeout=5)


def breaker_of(mesh: Mesh, caller: str, replica: str) -> pb.BreakerEndpoint | None:
    """``caller``'s last reported breaker for ``replica`` (an endpoint of echo)."""
    for e in breakers(mesh).endpoints:
        if (e.instance, e.upstream, e.endpoint_instance) == (caller, "echo", replica):
            return e
    return None


class Load:
    """Sequential Unary calls from a caller in a thread until stopped; outcomes by
    (code, server id) for OK, by code otherwise."""

    def __init__(self, stub: echo_pb2_grpc.EchoStub, pause_s: float = 0.02) -> None:
        self.stub = stub
        self.pause_s = pause_s
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            code, detail = unary(self.stub, timeout=5)
            self.seen[(code.name, detail if code == grpc.StatusCode.OK else "")] += 1
            self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------------- retries
def test_retries_mask_a_replica_failing_half_its_calls_but_not_a_non_idempotent_method(
        mesh: Mesh, tmp_path: Path) -> None:
    apply_policy(mesh, tmp_path, load_balancer="round_robin",
                 retries={"max_attempts": 3, "budget_percent": 100,
                          "non_idempotent": [{"exact": SERVER_STREAM}]})
    sicken(mesh, "echo-1", 0.5)
    try:
        before = {r: received(mesh, r) for r in REPLICAS}
        failed_before = failed(mesh, "echo-1")
        ch, stub = echo_stub(mesh)
        with ch:
            outcomes = collections.Counter(unary(stub)[0] for _ in range(100))
            assert outcomes == {grpc.StatusCode.OK: 100}, outcomes  # every failure masked
            attempts = sum(received(mesh, r) - before[r] for r in REPLICAS)
            failures = failed(mesh, "echo-1") - failed_before
            assert failures >= 10, failures  # echo-1 did fail its share ...
            assert attempts == 100 + failures, (attempts, failures)  # ... each retried once

            # The same failures on a method marked non-idempotent reach the caller.
            ss_before = {r: received(mesh, r, "ServerStream") for r in REPLICAS}
            ss_failed_before = failed(mesh, "echo-1", "ServerStream")
            results = [server_stream(stub) for _ in range(60)]
        errors = [(code, detail) for code, detail in results if code != grpc.StatusCode.OK]
        ss_failures = failed(mesh, "echo-1", "ServerStream") - ss_failed_before
        assert ss_failures >= 5 and len(errors) == ss_failures, (errors, ss_failures)
        assert all(code == grpc.StatusCode.UNAVAILABLE and "failing by --fail-rate" in detail
                   for code, detail in errors), errors
        ss_attempts = sum(received(mesh, r, "ServerStream") - ss_before[r] for r in REPLICAS)
        assert ss_attempts == 60, ss_attempts  # never sent twice
    finally:
        sicken(mesh, "echo-1", 0)


def test_the_budget_caps_retries_while_every_replica_fails(mesh: Mesh, tmp_path: Path) -> None:
    # The default terms, 3 attempts on UNAVAILABLE and retries within 20% of the requests
    # plus 10 per second, over windows of 2 s (the default 10 s would need a long test):
    # over D seconds, at most 20% of the calls + 10/s × D (D a whole number of windows).
    # Outlier detection off, so that both replicas keep failing every attempt; web-2 has
    # made no call before, so every window is this test's alone.
    window_s, duration_s = 2.0, 6.0
    apply_policy(mesh, tmp_path, load_balancer="round_robin",
                 retries={"budget_window_s": window_s},
                 outlier_detection={"consecutive_errors": 0})
    for r in REPLICAS:
        sicken(mesh, r, 1.0)
    try:
        before = sum(received(mesh, r) for r in REPLICAS)
        ch, stub = echo_stub(mesh, "web-2")
        calls = 0
        codes: collections.Counter[grpc.StatusCode] = collections.Counter()
        with ch:
            started = time.monotonic()
            while time.monotonic() - started < duration_s - 0.05:
                codes[unary(stub)[0]] += 1
                calls += 1
            took = time.monotonic() - started
        assert codes == {grpc.StatusCode.UNAVAILABLE: calls}, codes
        attempts = sum(received(mesh, r) for r in REPLICAS) - before
        retries = attempts - calls
        windows = math.ceil(took / window_s)
        allowed = 0.2 * calls + 10 * window_s * windows
        assert calls >= 150, calls  # enough calls for the 20% to matter
        # Without a budget every call would be tried 3 times: 2 retries per call.
        assert retries <= allowed + 2, (retries, allowed, calls, took)
        assert retries >= 0.5 * allowed, (retries, allowed, calls, took)  # the budget is used
        assert attempts < 1.5 * calls, (attempts, calls)
    finally:
        for r in REPLICAS:
            sicken(mesh, r, 0)


# ---------------------------------------------------------------------- outlier detection
EJECT = {"consecutive_errors": 3, "base_ejection_ms": 1000, "max_ejection_ms": 3000,
         "half_open_probes": 1}


def test_a_failing_replica_is_ejected_shown_open_and_returns_through_half_open(
        mesh: Mesh, tmp_path: Path) -> None:
    apply_policy(mesh, tmp_path, load_balancer="round_robin", retries={"max_attempts": 1},
                 outlier_detection=EJECT)
    sicken(mesh, "echo-1", 1.0)
    ch, stub = echo_stub(mesh)
    with ch:
        # Sequential calls: echo-1 takes every other one and fails it, until it is ejected
        # at its third error in a row; then every call goes to echo-2.
        failed_before = failed(mesh, "echo-1")
        errors = 0
        for _ in range(20):
            code, _ = unary(stub)
            errors += code != grpc.StatusCode.OK
            if errors == 3:
                break
        assert errors == 3, errors
        after = [unary(stub) for _ in range(20)]
        assert failed(mesh, "echo-1") - failed_before == 3
        probes = sum(code != grpc.StatusCode.OK for code, _ in after)
        assert probes <= 1 and {s for c, s in after if c == grpc.StatusCode.OK} == {"echo-2"}, \
            after

        # Calls keep coming: every half-open probe fails and ejects it again, for longer.
        with Load(stub) as load:
            row = procs.wait_for(lambda: (b := breaker_of(mesh, "web-1", "echo-1"))
                                 and b.state == "OPEN" and b.ejections >= 2 and b, 15,
                                 interval_s=0.1, what="echo-1 OPEN again in ListBreakers")
            assert 0 < row.half_open_in_s <= 3.0 and row.consecutive_errors >= 1, row
            r = meshctl(mesh.cp, "breakers", "-o", "json")
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            assert set(doc) == {"endpoints", "limits"}
            rows = {(e["instance"], e["upstream"], e["endpoint_instance"]): e
                    for e in doc["endpoints"]}
            shown = rows[("web-1", "echo", "echo-1")]
            assert {"instance", "service", "upstream", "endpoint", "state",
                    "consecutive_errors", "ejections", "half_open_in_s"} <= set(shown)
            assert shown["service"] == "web" and shown["ejections"] >= 2, shown
            assert shown["endpoint"] == mesh.sidecars["echo-1"].ready["inbound"], shown
            assert rows[("web-1", "echo", "echo-2")]["state"] == "CLOSED", rows
            # echo-1 stays out most of the time: the failures are the probes alone.
            assert shown["state"] in ("OPEN", "HALF_OPEN"), shown
            table = meshctl(mesh.cp, "breakers", "--service", "web")
            assert table.returncode == 0, table.stderr
            line = next(x for x in table.stdout.splitlines() if "echo-1" in x and "web-1" in x)
            assert "OPEN" in line or "HALF_OPEN" in line, table.stdout
        seen = load.seen  # echo-1's failures are its probes alone
        assert seen[("OK", "echo-2")] > 10 * seen[("UNAVAILABLE", "")], seen

        # Healed: once its ejection is over it is HALF_OPEN (no call yet), a probe goes
        # through and closes it, and it gets calls again.
        sicken(mesh, "echo-1", 0)
        procs.wait_for(lambda: (b := breaker_of(mesh, "web-1", "echo-1"))
                       and b.state == "HALF_OPEN", 15, interval_s=0.1,
                       what="echo-1 HALF_OPEN once its ejection is over")
        served_before = received(mesh, "echo-1")
        outcomes = collections.Counter(unary(stub) for _ in range(20))
        assert outcomes[(grpc.StatusCode.OK, "echo-1")] >= 5, outcomes
        assert sum(n for (c, _), n in outcomes.items() if c == grpc.StatusCode.OK) == 20
        assert received(mesh, "echo-1") > served_before
        closed = procs.wait_for(lambda: (b := breaker_of(mesh, "web-1", "echo-1"))
                                and b.state == "CLOSED" and b, 10, interval_s=0.1,
                                what="echo-1 CLOSED after its probe")
        assert closed.consecutive_errors == 0 and closed.half_open_in_s == 0, closed


def test_a_replica_answering_failed_precondition_is_never_ejected(mesh: Mesh,
                                                                 tmp_path: Path) -> None:
    apply_policy(mesh, tmp_path, load_balancer="round_robin", retries={"max_attempts": 1},
                 outlier_detection=EJECT)
    procs.wait_for(lambda: (b := breaker_of(mesh, "web-1", "echo-1")) and b.state == "CLOSED",
                   10, what="echo-1 CLOSED")
    ejections = breaker_of(mesh, "web-1", "echo-1").ejections  # type: ignore[union-attr]
    sicken(mesh, "echo-1", 1.0, FAILED_PRECONDITION)
    try:
        before = received(mesh, "echo-1")
        ch, stub = echo_stub(mesh)
        with ch:
            outcomes = collections.Counter(unary(stub)[0] for _ in range(40))
        # A business answer: passed on, not retried, and never counted against echo-1,
        # which keeps its share (far more than 3 in a row).
        got = received(mesh, "echo-1") - before
        assert got >= 15, got
        assert outcomes == {grpc.StatusCode.FAILED_PRECONDITION: got,
                            grpc.StatusCode.OK: 40 - got}, outcomes
        # After a report that covers the calls: still CLOSED, no error counted.
        reported = time.time()
        row = procs.wait_for(lambda: (b := breaker_of(mesh, "web-1", "echo-1"))
                             and b.reported_at_unix > reported + 0.1 and b, 10,
                             interval_s=0.1, what="a report after the calls")
        assert (row.state, row.consecutive_errors, row.ejections) == ("CLOSED", 0, ejections)
    finally:
        sicken(mesh, "echo-1", 0)


# ---------------------------------------------------------------------- limits
def test_limits_fast_fail_past_their_maximum_and_meshctl_shows_them(mesh: Mesh,
                                                                    tmp_path: Path) -> None:
    apply_policy(mesh, tmp_path, load_balancer="round_robin", limits={"max_requests": 2})
    slow_ms = 4000
    ch, stub = echo_stub(mesh)
    pool = cf.ThreadPoolExecutor(8)
    with ch:
        try:
            base = sum(received(mesh, r) for r in REPLICAS)
            slow = [pool.submit(unary, stub, slow_ms) for _ in range(2)]
            procs.wait_for(lambda: sum(received(mesh, r) for r in REPLICAS) - base == 2, 5,
                           what="two slow calls at the servers")

            def timed() -> tuple[float, grpc.StatusCode, str]:
                started = time.monotonic()
                code, detail = unary(stub)
                return time.monotonic() - started, code, detail

            rest = [f.result() for f in [pool.submit(timed) for _ in range(4)]]
            for took, code, detail in rest:
                assert code == grpc.StatusCode.UNAVAILABLE, (code, detail)
                assert "fast-fail" in detail and "limit" in detail, detail
                assert took < 1.0, took
            assert sum(received(mesh, r) for r in REPLICAS) - base == 2  # none reached a server

            def full() -> pb.BreakerLimit | None:
                for x in breakers(mesh, "web").limits:
                    if (x.instance, x.upstream, x.limit) == ("web-1", "echo", "max_requests") \
                            and x.in_use == 2:
                        return x
                return None

            limit = procs.wait_for(full, 5, interval_s=0.1, what="2/2 requests in ListBreakers")
            assert limit.max == 2
            r = meshctl(mesh.cp, "breakers", "-o", "json", "--service", "echo")
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            mine = {x["limit"]: x for x in doc["limits"]
                    if (x["instance"], x["upstream"]) == ("web-1", "echo")}
            assert {"max_connections", "max_pending", "max_requests", "max_retries"} <= set(mine)
            for x in mine.values():
                assert {"instance", "upstream", "limit", "in_use", "max"} <= set(x), x
                assert 0 <= x["in_use"] <= x["max"], x
            assert mine["max_requests"]["max"] == 2 and mine["max_retries"]["max"] == 16
            table = meshctl(mesh.cp, "breakers")
            assert table.returncode == 0, table.stderr
            assert "REQUESTS" in table.stdout and "/2" in table.stdout, table.stdout
            assert [f.result()[0] for f in slow] == [grpc.StatusCode.OK] * 2
        finally:
            pool.shutdown(wait=True)
        # Under the limit again: calls go through.
        assert unary(stub)[0] == grpc.StatusCode.OK


def test_meshctl_breakers_filters_by_service(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "breakers", "--service", "nosuch", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"endpoints": [], "limits": []}
    r = meshctl(mesh.cp, "breakers", "--service", "web", "-o", "yaml")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["endpoints"] and {e["service"] for e in doc["endpoints"]} == {"web"}
    assert {e["instance"] for e in doc["endpoints"]} == set(CALLERS)
    assert {e["upstream"] for e in doc["endpoints"]} == {"echo"}
