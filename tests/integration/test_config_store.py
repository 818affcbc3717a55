"""Declarative config through a real control plane and meshctl: apply (files, directories,
stdin, dry runs), get (tables, JSON, YAML, revisions), delete, diff, fault inject/clear; an
invalid apply changes nothing; a revision restores; every change bumps the snapshot version;
config survives a restart. One control plane for the module (no sidecars), in file order.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.integration.test_control_plane import ControlPlaneProc, admin_channel, meshctl, start_cp
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(120)


class Holder:
    """The module's control plane, restartable on the same directories."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cp = start_cp(base / "ca", base / "data")
        self._channel: grpc.Channel | None = None

    def admin(self) -> pb_grpc.AdminStub:
        """meshctl's credentials in-process: for looking, quicker than a meshctl process."""
        if self._channel is None:
            self._channel = admin_channel(self.cp)
        return pb_grpc.AdminStub(self._channel)

    def version(self) -> int:
        """The latest snapshot version (what ``meshctl status`` titles)."""
        return int(self.admin().ListSidecars(pb.ListSidecarsRequest(), timeout=10)
                   .latest_version)

    def stored(self, kind: str, name: str = "") -> list[tuple[str, int, float, str]]:
        """``(name, revision, applied_at, json)`` of the current objects (none: NOT_FOUND)."""
        try:
            resp = self.admin().GetConfig(pb.GetConfigRequest(kind=kind, name=name), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # type: ignore[attr-defined]
            return []
        return [(o.name, o.revision, o.applied_at_unix, o.json) for o in resp.objects]

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def restart(self) -> None:
        self.close()
        assert self.cp.proc.stop() == 0, self.cp.proc.log_tail()
        self.cp = start_cp(self.base / "ca", self.base / "data")


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Holder]:
    h = Holder(tmp_path_factory.mktemp("config"))
    yield h
    h.close()
    assert h.cp.proc.stop() == 0, h.cp.proc.log_tail()


def ok(cp: ControlPlaneProc, *args: str) -> str:
    r = meshctl(cp, *args)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


def fails(cp: ControlPlaneProc, *args: str) -> str:
    r = meshctl(cp, *args)
    assert r.returncode != 0, (args, r.stdout)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("meshctl: error: "), r.stderr
    assert "Traceback" not in line
    return line


def write(path: Path, *docs: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def status_version(cp: ControlPlaneProc) -> int:
    m = re.search(r"latest snapshot version (\d+)", ok(cp, "status"))
    assert m, "no version in meshctl status"
    return int(m.group(1))


def route(name: str = "echo", service: str = "echo", *weights: int) -> dict[str, Any]:
    dests = [{"subset": {"version": f"v{i}"}, "weight": w} for i, w in enumerate(weights, 1)]
    return {"kind": "Route", "name": name,
            "spec": {"service": service, "rules": [{"destinations": dests or [{"weight": 100}]}]}}


POLICY = {"kind": "TrafficPolicy", "name": "echo",
          "spec": {"service": "echo", "load_balancer": "round_robin", "timeout_ms": 1500}}


def test_apply_prints_one_line_per_object_and_get_shows_them(holder: Holder,
                                                             tmp_path: Path) -> None:
    cp = holder.cp
    path = write(tmp_path / "routes.yaml", route("echo", "echo", 90, 10), POLICY)
    before = holder.version()
    assert ok(cp, "apply", "-f", path, "--dry-run").splitlines() == [
        "route/echo created (revision 1, dry run)",
        "trafficpolicy/echo created (revision 1, dry run)"]
    fails(cp, "get", "route", "echo")  # a dry run stores nothing
    assert holder.version() == before
    assert ok(cp, "apply", "-f", path).splitlines() == [
        "route/echo created (revision 1)", "trafficpolicy/echo created (revision 1)"]
    assert ok(cp, "apply", "-f", path).splitlines() == [
        "route/echo unchanged (revision 1)", "trafficpolicy/echo unchanged (revision 1)"]

    table = ok(cp, "get", "Routes")
    assert "KIND" in table and re.search(r"Route\s+echo\s+echo\s+1\s", table), table
    got = json.loads(ok(cp, "get", "TRAFFICPOLICY", "echo", "-o", "json"))
    assert {k: got[k] for k in ("kind", "name", "spec", "revision", "deleted")} == {
        **POLICY, "revision": 1, "deleted": False}
    listed = json.loads(ok(cp, "get", "routes", "-o", "json"))
    assert [(o["name"], o["spec"]["rules"][0]["destinations"][1]["weight"]) for o in listed] == [
        ("echo", 10)]
    docs = list(yaml.safe_load_all(ok(cp, "get", "route", "-o", "yaml")))
    assert docs == [route("echo", "echo", 90, 10)]  # the canonical form of what was applied
    assert "unknown kind 'gateways'" in fails(cp, "get", "gateways")
    assert "NOT_FOUND: no Route named 'nope'" in fails(cp, "get", "route", "nope")


def test_every_change_bumps_the_snapshot_version_and_no_change_does_not(holder: Holder,
                                                                       tmp_path: Path) -> None:
    cp = holder.cp
    v0 = holder.version()
    ok(cp, "apply", "-f", write(tmp_path / "a.yaml", route("echo", "echo", 80, 20)))
    v1 = holder.version()
    ok(cp, "apply", "-f", write(tmp_path / "b.yaml", route("echo", "echo", 80, 20)))
    assert holder.version() == v1 > v0  # unchanged: same version
    ok(cp, "apply", "-f", write(tmp_path / "c.yaml", route("pay", "payment")))  # no instances
    v2 = holder.version()
    assert ok(cp, "delete", "route", "pay") == "route/pay deleted (revision 2)\n"
    v3 = holder.version()
    assert v3 > v2 > v1
    # A stored change that compiles to the same snapshot still gets a new version.
    ok(cp, "apply", "-f", write(tmp_path / "d.yaml", {
        "kind": "TrafficPolicy", "name": "echo",
        "spec": {"service": "echo", "load_balancer": "round_robin"}}))
    v4 = holder.version()
    assert v4 > v3
    assert status_version(cp) == v4  # what meshctl status titles
    ok(cp, "delete", "trafficpolicy", "echo")


BAD: dict[str, tuple[str, list[str]]] = {
    "bad yaml": ("kind: Route\nname: [unclosed\n", ["document 2: invalid YAML"]),
    "unknown kind": (yaml.safe_dump({"kind": "Gateway", "name": "g", "spec": {}}),
                     ["document 2: kind: unknown kind 'Gateway'"]),
    "unknown field": (yaml.safe_dump({**route(), "spec": {"service": "echo", "retries": 3}}),
                      ["document 2 (Route echo): spec.retries: unknown key"]),
    "weights": (yaml.safe_dump(route("echo", "echo", 90, 5)),
                ["document 2 (Route echo): spec.rules[0].destinations: weights must sum to 100, "
                 "they sum to 95"]),
    "second route": (yaml.safe_dump(route("echo-2", "echo")),
                     ["document 2 (Route echo-2): spec.service: service 'echo' already has Route "
                      "echo (stored); one Route per service"]),
    "bad regex": (yaml.safe_dump({**route(), "spec": {"service": "echo", "rules": [
        {"match": {"headers": {"x-user": {"regex": "("}}}}]}}),
        ["spec.rules[0].match.headers.x-user.regex: not a valid regular expression"]),
    "bad code": (yaml.safe_dump({"kind": "Fault", "name": "echo", "spec": {
        "service": "echo", "abort": {"code": "SOMETIMES", "percent": 5}}}),
        ["document 2 (Fault echo): spec.abort.code"]),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_an_invalid_apply_changes_nothing_and_names_the_problem(
        holder: Holder, tmp_path: Path, case: tuple[str, list[str]]) -> None:
    cp = holder.cp
    text, expected = case
    before = (holder.stored("Route"), holder.stored("TrafficPolicy"), holder.version())
    path = tmp_path / "bad.yaml"
    good = {"kind": "TrafficPolicy", "name": "other", "spec": {"service": "order"}}
    path.write_text(yaml.safe_dump(good) + "---\n" + text)
    line = fails(cp, "apply", "-f", str(path))
    assert f"meshctl: error: {path}: document 2" in line, line
    for part in expected:
        assert part in line, (part, line)
    # nothing of it was stored, not even the valid first document
    assert (holder.stored("Route"), holder.stored("TrafficPolicy"), holder.version()) == before
    assert line == fails(cp, "diff", "-f", str(path))  # diff validates the same way


def test_diff_then_a_previous_revision_restores_the_route(holder: Holder,
                                                          tmp_path: Path) -> None:
    cp = holder.cp
    current = json.loads(ok(cp, "get", "route", "echo", "-o", "json"))
    same = write(tmp_path / "same.yaml", {k: current[k] for k in ("kind", "name", "spec")})
    assert ok(cp, "diff", "-f", same) == "no changes\n"
    changed = write(tmp_path / "new.yaml", route("echo", "echo", 50, 50),
                    route("new", "gateway"))
    d = ok(cp, "diff", "-f", changed)
    assert f"--- route/echo (revision {current['revision']})" in d, d
    assert "+++ route/echo (proposed)" in d and "-      weight: 80" in d
    assert "+      weight: 50" in d
    assert "--- /dev/null" in d and "+++ route/new (proposed)" in d
    fails(cp, "get", "route", "new")  # a diff stores nothing

    rev = current["revision"]
    assert ok(cp, "apply", "-f", write(tmp_path / "split.yaml", route("echo", "echo", 50, 50))
              ) == f"route/echo configured (revision {rev + 1})\n"
    old = ok(cp, "get", "route", "echo", "--revision", str(rev), "-o", "yaml")
    assert old.startswith(f"# route/echo revision {rev}, applied ")
    (tmp_path / "old.yaml").write_text(old)
    assert ok(cp, "apply", "-f", str(tmp_path / "old.yaml")) == (
        f"route/echo configured (revision {rev + 2})\n")
    restored = json.loads(ok(cp, "get", "route", "echo", "-o", "json"))
    assert (restored["spec"], restored["revision"]) == (current["spec"], rev + 2)
    assert "NOT_FOUND: Route echo has no revision 99" in fails(
        cp, "get", "route", "echo", "--revision", "99")


def test_fault_inject_and_clear_write_and_delete_the_services_fault(holder: Holder) -> None:
    cp = holder.cp
    v0 = holder.version()
    assert ok(cp, "fault", "inject", "echo", "--abort", "unavailable", "--percent", "100"
              ) == "fault/echo created (revision 1)\n"
    assert ok(cp, "fault", "inject", "echo", "--method", "/meshtest.Echo/", "--delay", "200",
              "--percent", "50", "--abort", "13", "--abort-percent", "2.5"
              ) == "fault/echo configured (revision 2)\n"
    got = json.loads(ok(cp, "get", "fault", "echo", "-o", "json"))
    assert got["spec"] == {"service": "echo", "method": {"prefix": "/meshtest.Echo/"},
                           "delay": {"ms": 200, "percent": 50},
                           "abort": {"code": "INTERNAL", "percent": 2.5}}
    assert holder.version() > v0
    assert "spec.method.exact: a gRPC path starts with '/'" in fails(
        cp, "fault", "inject", "echo", "--method", "Unary", "--delay", "5", "--percent", "1")
    assert "--percent" in fails(cp, "fault", "inject", "echo", "--delay", "5")
    assert ok(cp, "fault", "clear", "echo") == "fault/echo deleted (revision 3)\n"
    assert fails(cp, "fault", "clear", "echo") == (
        "meshctl: error: no fault injected into echo (no Fault named 'echo')")
    old = ok(cp, "get", "fault", "echo", "--revision", "3", "-o", "yaml")
    assert old.startswith("# fault/echo revision 3") and "deleted at this revision" in old


def test_apply_takes_a_directory_and_stdin(holder: Holder, tmp_path: Path) -> None:
    cp = holder.cp
    d = tmp_path / "dir"
    d.mkdir()
    write(d / "b.yml", route("dir-b", "order"))
    write(d / "a.yaml", route("dir-a", "inventory"))
    (d / "notes.txt").write_text("not config")
    assert ok(cp, "apply", "-f", str(d)).splitlines() == [
        "route/dir-a created (revision 1)", "route/dir-b created (revision 1)"]
    r = subprocess.run([sys.executable, "-m", "control_plane.meshctl", "--control-plane", cp.api,
                        "--certs-dir", str(cp.ca_dir), "apply", "-f", "-"],
                       input=yaml.safe_dump(route("dir-a", "inventory", 100)),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "route/dir-a configured (revision 2)\n"), r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no *.yaml or *.yml files" in fails(cp, "apply", "-f", str(empty))
    assert "cannot read" in fails(cp, "apply", "-f", str(tmp_path / "missing.yaml"))


def test_config_survives_a_control_plane_restart(holder: Holder) -> None:
    def state() -> tuple[Any, ...]:
        return (ok(holder.cp, "get", "routes", "-o", "json"),
                ok(holder.cp, "get", "trafficpolicy", "-o", "yaml"),
                holder.stored("Route"), holder.stored("Fault"), holder.version())

    before = state()
    assert before[2] and before[3] == []  # routes stored; the fault was cleared
    holder.restart()
    # The same objects, revisions and times, and the same snapshot version: the config is in
    # the first snapshot after the restart (without it the content, and so the version, moves).
    assert state() == before
    assert ok(holder.cp, "get", "fault", "echo", "--revision", "2", "-o", "json")
