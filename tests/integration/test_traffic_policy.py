"""Traffic policy with real processes: config applied through meshctl reaches the callers'
sidecars and shapes their calls: a weighted canary split, a header match, route timeouts
against caller deadlines, injected aborts and delays, refused applies, diff, revision restore
and a control-plane restart. One mesh (web → echo v1/v2) shared by the module, in file order.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_control_plane import meshctl
from tests.integration.test_discovery import Mesh
from tests.support import procs

pytestmark = pytest.mark.timeout(180)

UNARY = "/meshtest.Echo/Unary"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("policy"))
    try:
        m.start("echo", "echo-1", labels=("version=v1",))
        m.start("echo", "echo-2", labels=("version=v2",))
        m.start("web", "web-1", app=False)
        procs.wait_for(lambda: m.all_synced({"echo-1", "echo-2", "web-1"}), 20,
                       what="every sidecar SYNCED")
        yield m
    finally:
        m.close()


def ctl(mesh: Mesh, *args: str) -> Any:
    return meshctl(mesh.cp, *args)


def apply(mesh: Mesh, tmp_path: Path, docs: list[dict[str, Any]], name: str = "cfg.yaml",
          ok: bool = True) -> Any:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    r = ctl(mesh, "apply", "-f", str(path))
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def route(*rules: dict[str, Any], name: str = "echo", timeout_ms: int | None = None
          ) -> dict[str, Any]:
    spec: dict[str, Any] = {"service": "echo", "rules": list(rules)}
    if timeout_ms is not None:
        spec["timeout_ms"] = timeout_ms
    return {"kind": "Route", "name": name, "spec": spec}


def split(v1: int, v2: int) -> dict[str, Any]:
    return {"destinations": [{"subset": {"version": "v1"}, "weight": v1},
                             {"subset": {"version": "v2"}, "weight": v2}]}


def web_routes(mesh: Mesh) -> dict[str, Any]:
    """The echo route in web's snapshot (empty when none)."""
    for r in mesh.held("web-1")["snapshot"]["routes"]:
        if r["service"] == "echo":
            return r
    return {}


def wait_route(mesh: Mesh, predicate: Any, what: str) -> dict[str, Any]:
    return procs.wait_for(lambda: (r := web_routes(mesh)) and predicate(r) and r, 15,
                          interval_s=0.2, what=what)


class Web:
    """Calls to echo through web's sidecar."""

    def __init__(self, mesh: Mesh) -> None:
        self.channel = grpc.insecure_channel(mesh.sidecars["web-1"].ready["outbound"],
                                             options=[("grpc.default_authority", "echo")])
        self.stub = echo_pb2_grpc.EchoStub(self.channel)

    def __enter__(self) -> Web:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def spread(self, n: int, metadata: tuple[tuple[str, str], ...] = ()) -> collections.Counter[str]:
        return collections.Counter(
            self.stub.Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5,
                            metadata=metadata).server_id for _ in range(n))

    def timed(self, req: echo_pb2.EchoRequest, timeout: float | None
              ) -> tuple[float, grpc.StatusCode, dict[str, str]]:
        started = time.monotonic()
        try:
            _, call = self.stub.Unary.with_call(req, timeout=timeout)
            code, md = grpc.StatusCode.OK, dict(call.initial_metadata())
        except grpc.RpcError as exc:
            code, md = exc.code(), {}  # type: ignore[attr-defined]
        return time.monotonic() - started, code, md


def test_a_90_10_split_lands_within_3_points_of_90_10(mesh: Mesh, tmp_path: Path) -> None:
    apply(mesh, tmp_path, [route(split(90, 10))])
    wait_route(mesh, lambda r: [d["weight"] for d in r["rules"][0]["destinations"]] == [90, 10],
               "the 90/10 route in web's snapshot")
    with Web(mesh) as web:
        seen = web.spread(1000)
    assert set(seen) == {"echo-1", "echo-2"}, seen
    share = 100 * seen["echo-2"] / 1000
    assert 7 <= share <= 13, seen


def test_a_header_match_sends_only_matching_calls_to_v2(mesh: Mesh, tmp_path: Path) -> None:
    apply(mesh, tmp_path, [route(
        {"name": "canary", "match": {"headers": {"x-canary": {"exact": "yes"}}},
         "destinations": [{"subset": {"version": "v2"}}]},
        {"destinations": [{"subset": {"version": "v1"}}]})])
    wait_route(mesh, lambda r: r["rules"] and r["rules"][0]["name"] == "canary",
               "the header route in web's snapshot")
    with Web(mesh) as web:
        assert web.spread(30, (("x-canary", "yes"),)) == {"echo-2": 30}
        assert web.spread(30, (("x-canary", "no"),)) == {"echo-1": 30}
        assert web.spread(30) == {"echo-1": 30}


def test_a_route_timeout_fires_and_a_sooner_caller_deadline_wins(mesh: Mesh,
                                                                 tmp_path: Path) -> None:
    apply(mesh, tmp_path, [route({"match": {"method": {"exact": UNARY}}, "timeout_ms": 400})])
    wait_route(mesh, lambda r: r["rules"] and r["rules"][0]["timeout_ms"] == 400,
               "the timeout route in web's snapshot")
    slow = echo_pb2.EchoRequest(payload=b"s", sleep_ms=2000)
    with Web(mesh) as web:
        took, code, _ = web.timed(slow, None)  # no caller deadline: the route's fires
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.35 <= took < 1.5, (code, took)
        took, code, _ = web.timed(slow, 0.15)  # the caller's is sooner: it wins
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 0.35, (code, took)
        # The deadline the server sees is the remaining one: the route's, or the caller's.
        fast = echo_pb2.EchoRequest(payload=b"f")
        _, code, md = web.timed(fast, 5.0)
        assert code == grpc.StatusCode.OK
        assert 100 < int(md["x-deadline-remaining-ms"]) <= 400, md
        _, code, md = web.timed(fast, 0.25)
        assert code == grpc.StatusCode.OK
        assert 50 < int(md["x-deadline-remaining-ms"]) <= 250, md


def test_an_injected_abort_and_delay_reach_the_caller_until_cleared(mesh: Mesh) -> None:
    r = ctl(mesh, "fault", "inject", "echo", "--abort", "UNAVAILABLE", "--percent", "100")
    assert r.returncode == 0, r.stderr
    procs.wait_for(lambda: web_routes(mesh).get("faults"), 15, what="the fault in web's snapshot")
    req = echo_pb2.EchoRequest(payload=b"a")
    with Web(mesh) as web:
        for _ in range(5):
            try:
                web.stub.Unary(req, timeout=5)
                raise AssertionError("the injected abort did not reach the caller")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # type: ignore[attr-defined]
                assert "fault injected" in exc.details(), exc.details()  # type: ignore[attr-defined]
        r = ctl(mesh, "fault", "clear", "echo")
        assert r.returncode == 0, r.stderr
        procs.wait_for(lambda: not web_routes(mesh).get("faults"), 15, what="the fault cleared")
        assert web.stub.Unary(req, timeout=5).payload == b"a"

        fast, _, _ = web.timed(req, 5.0)
        r = ctl(mesh, "fault", "inject", "echo", "--delay", "300", "--percent", "100")
        assert r.returncode == 0, r.stderr
        procs.wait_for(lambda: web_routes(mesh).get("faults"), 15, what="the delay in web's snapshot")
        took, code, _ = web.timed(req, 5.0)
        assert code == grpc.StatusCode.OK and took >= 0.3, (code, took)
        assert ctl(mesh, "fault", "clear", "echo").returncode == 0
        procs.wait_for(lambda: not web_routes(mesh).get("faults"), 15, what="the delay cleared")
        took, code, _ = web.timed(req, 5.0)
        assert code == grpc.StatusCode.OK and took < 0.3, (code, took, fast)
    r = ctl(mesh, "fault", "clear", "echo")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _version(mesh: Mesh) -> str:
    return mesh.status()["web-1"].sent_version


@pytest.mark.parametrize("case", ["bad yaml", "unknown kind", "unknown field", "weights"])
def test_an_invalid_apply_changes_nothing_and_names_the_problem(mesh: Mesh, tmp_path: Path,
                                                                case: str) -> None:
    before_get = ctl(mesh, "get", "route", "echo", "-o", "json")
    assert before_get.returncode == 0, before_get.stderr
    before_version = _version(mesh)
    good = {"kind": "TrafficPolicy", "name": "echo-policy",
            "spec": {"service": "echo", "timeout_ms": 1234}}
    path = tmp_path / "bad.yaml"
    if case == "bad yaml":
        path.write_text(yaml.safe_dump(good) + "---\nkind: Route\nname: [unclosed\n")
        expect = ["bad.yaml", "document 2"]
    else:
        bad = {"unknown kind": {"kind": "Gateway", "name": "x", "spec": {}},
               "unknown field": {"kind": "Route", "name": "echo", "spec": {
                   "service": "echo", "rules": [split(50, 50)], "retries": 3}},
               "weights": route(split(90, 5))}[case]
        path.write_text(yaml.safe_dump_all([good, bad], sort_keys=False))
        expect = {"unknown kind": ["bad.yaml", "document 2", "Gateway"],
                  "unknown field": ["bad.yaml", "document 2", "retries"],
                  "weights": ["bad.yaml", "document 2", "destinations", "100"]}[case]
    r = ctl(mesh, "apply", "-f", str(path))
    assert r.returncode != 0, r.stdout
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, r.stderr
    for word in expect:
        assert word in line, (word, line)
    # Nothing of that apply took effect, not even its valid first document.
    assert ctl(mesh, "get", "route", "echo", "-o", "json").stdout == before_get.stdout
    missing = ctl(mesh, "get", "trafficpolicy", "echo-policy")
    assert missing.returncode != 0
    assert _version(mesh) == before_version


def test_diff_shows_a_change_and_a_revision_restores_the_old_route(mesh: Mesh,
                                                                   tmp_path: Path) -> None:
    apply(mesh, tmp_path, [route({"destinations": [{"subset": {"version": "v1"}}]})], "a.yaml")
    first = json.loads(ctl(mesh, "get", "route", "echo", "-o", "json").stdout)
    first = first[0] if isinstance(first, list) else first
    v2only = [route({"destinations": [{"subset": {"version": "v2"}}]})]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump_all(v2only, sort_keys=False))
    d = ctl(mesh, "diff", "-f", str(tmp_path / "b.yaml"))
    assert d.returncode in (0, 1), d.stderr
    assert "-" in d.stdout and "+" in d.stdout and "v2" in d.stdout, d.stdout
    same = ctl(mesh, "diff", "-f", str(tmp_path / "a.yaml"))
    assert "no changes" in same.stdout, same.stdout
    apply(mesh, tmp_path, v2only, "b.yaml")
    wait_route(mesh, lambda r: r["rules"][0]["destinations"][0]["subset"] == {"version": "v2"},
               "the v2-only route in web's snapshot")
    with Web(mesh) as web:
        assert web.spread(10) == {"echo-2": 10}
    old = ctl(mesh, "get", "route", "echo", "--revision", str(first["revision"]), "-o", "yaml")
    assert old.returncode == 0, old.stderr
    (tmp_path / "old.yaml").write_text(old.stdout)
    assert ctl(mesh, "apply", "-f", str(tmp_path / "old.yaml")).returncode == 0
    wait_route(mesh, lambda r: r["rules"][0]["destinations"][0]["subset"] == {"version": "v1"},
               "the restored v1-only route in web's snapshot")
    with Web(mesh) as web:
        assert web.spread(10) == {"echo-1": 10}


def test_config_survives_a_control_plane_restart(mesh: Mesh) -> None:
    before = ctl(mesh, "get", "route", "echo", "-o", "json").stdout
    version = int(_version(mesh))
    if mesh._channel is not None:
        mesh._channel.close()
        mesh._channel = None
    assert mesh.cp.proc.stop() == 0, mesh.cp.proc.log_tail()
    mesh.restart_cp()
    assert ctl(mesh, "get", "route", "echo", "-o", "json").stdout == before
    procs.wait_for(lambda: mesh.all_synced({"echo-1", "echo-2", "web-1"}), 20,
                   what="every sidecar SYNCED after the restart")
    assert int(_version(mesh)) >= version
    assert web_routes(mesh)["rules"][0]["destinations"][0]["subset"] == {"version": "v1"}
    with Web(mesh) as web:
        assert web.spread(10) == {"echo-1": 10}
