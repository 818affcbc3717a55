"""The control plane's admin HTTP port.

With a real control plane process, two dynamic sidecars (web, outbound-only, calls echo) and
some traffic: ``/metrics`` parses and counts the connected sidecars, pushes, times to ACK and
certificates issued, an invalid apply bumps the apply errors; ``/api/topology`` carries the
golden signals; ``/topology.svg`` names every service; ``/`` is the dashboard; anything else
is 404 or 405; an explicit address that is taken fails the start with one line.

In-process, on loopback, with stand-in sources: the port's hardening (request head bound,
malformed requests, silent clients, connection cap), Graphviz missing as 503, and drawing
that never blocks the event loop and is cached.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane import http_admin
from control_plane.http_admin import DASHBOARD_CSP, AdminHttpServer
from control_plane.topology_render import RenderError
from protos.mesh.v1 import control_pb2 as pb
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_control_plane import ControlPlaneProc, start_cp
from tests.integration.test_discovery import CP_FLAGS, Mesh
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

CALLS = 60


# ---------------------------------------------------------------------- helpers
def get(address: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one request."""
    host, port = procs.hostport(address)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for f in fams.values() for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


class AdminMesh(Mesh):
    """test_discovery's mesh, its control plane with an admin HTTP port on a free port."""

    def _start_cp(self) -> ControlPlaneProc:
        return start_cp(self.base / "ca", self.base / "data",
                        "--listen", f"127.0.0.1:{self.api_port}",
                        "--bootstrap-listen", f"127.0.0.1:{self.boot_port}", *CP_FLAGS,
                        "--admin-http", "127.0.0.1:0")

    @property
    def http(self) -> str:
        return self.cp.proc.ready["admin_http"]

    def metrics(self) -> dict[str, Any]:
        status, headers, body = get(self.http, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain"), headers
        return families(body.decode())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminMesh]:
    m = AdminMesh(tmp_path_factory.mktemp("cp-admin-http"))
    try:
        m.start("echo", "echo-1")
        m.start("web", "web-1", app=False)
        procs.wait_for(lambda: m.all_synced({"echo-1", "web-1"}), 20,
                       what="both sidecars registered and SYNCED")
        ch = grpc.insecure_channel(m.sidecars["web-1"].ready["outbound"],
                                   options=[("grpc.default_authority", "echo")])
        with ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            for _ in range(CALLS):
                stub.Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
        yield m
    finally:
        m.close()


# ---------------------------------------------------------------------- a real control plane
def test_the_ready_line_names_the_admin_http_address(mesh: AdminMesh) -> None:
    host, port = procs.hostport(mesh.http)
    assert host == "127.0.0.1" and port > 0


def test_metrics_count_sidecars_pushes_acks_and_certificates(mesh: AdminMesh) -> None:
    fams = mesh.metrics()
    assert sample(fams, "mesh_cp_connected_sidecars", service="echo") == 1
    assert sample(fams, "mesh_cp_connected_sidecars", service="web") == 1
    assert sample(fams, "mesh_cp_registered_instances") == 2
    assert sample(fams, "mesh_cp_sidecars", state="SYNCED") == 2
    assert sample(fams, "mesh_cp_stale_sidecars") == 0
    assert sample(fams, "mesh_cp_snapshot_pushes_total") >= 2
    assert sample(fams, "mesh_cp_push_ack_seconds_count") >= 2
    assert 0 <= sample(fams, "mesh_cp_push_ack_seconds_sum") < 30
    assert sample(fams, "mesh_cp_certificates_issued_total", kind="join") == 2
    assert sample(fams, "mesh_cp_snapshot_version") >= 1
    assert sample(fams, "mesh_cp_snapshot_publishes_total") >= 1
    assert not any(name.endswith("_created") for name in fams)
    procs.wait_for(lambda: sample(mesh.metrics(), "mesh_cp_state_reports_total") > 0, 10,
                   what="state reports counted")


def test_a_renewal_counts_as_a_renew_certificate(mesh: AdminMesh) -> None:
    before = sample(mesh.metrics(), "mesh_cp_certificates_issued_total", kind="renew")
    resp = mesh.admin().RenewCertificates(pb.RenewCertificatesRequest(service="web"),
                                          timeout=10)
    assert list(resp.instances) == ["web-1"]
    procs.wait_for(lambda: sample(mesh.metrics(), "mesh_cp_certificates_issued_total",
                                  kind="renew") == before + 1, 15, what="a renewal counted")


def apply(mesh: AdminMesh, spec: dict[str, Any]) -> None:
    doc = {"kind": "TrafficPolicy", "name": "echo", "spec": {"service": "echo", **spec}}
    mesh.admin().ApplyConfig(pb.ApplyConfigRequest(documents=[pb.ConfigDocument(
        source="test", index=1, json=json.dumps(doc))]), timeout=10)


def metrics_once(mesh: AdminMesh, name: str, value: float) -> dict[str, Any]:
    """The control plane's metrics once ``name`` reads ``value`` (polled, 5 s at most)."""
    def read() -> dict[str, Any] | None:
        fams = mesh.metrics()
        return fams if sample(fams, name) == value else None
    return procs.wait_for(read, 5, what=f"{name} at {value}")


def test_an_invalid_apply_bumps_the_apply_errors(mesh: AdminMesh) -> None:
    fams = mesh.metrics()
    errors = sample(fams, "mesh_cp_config_apply_errors_total")
    applies = sample(fams, "mesh_cp_config_applies_total")
    with pytest.raises(grpc.RpcError) as err:
        apply(mesh, {"load_balancer": "no-such-balancer"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The count follows the answer (the server counts once its abort has sent the status).
    fams = metrics_once(mesh, "mesh_cp_config_apply_errors_total", errors + 1)
    assert sample(fams, "mesh_cp_config_applies_total") == applies
    apply(mesh, {"load_balancer": "round_robin"})
    fams = metrics_once(mesh, "mesh_cp_config_applies_total", applies + 1)
    assert sample(fams, "mesh_cp_config_apply_errors_total") == errors + 1


def test_the_topology_api_carries_the_golden_signals(mesh: AdminMesh) -> None:
    def doc() -> dict[str, Any] | None:
        status, headers, body = get(mesh.http, "/api/topology")
        assert status == 200 and headers["content-type"] == "application/json"
        d = json.loads(body)
        edges = {(e["source"], e["destination"]): e for e in d["edges"]}
        return d if edges.get(("web", "echo"), {}).get("requests", 0) >= CALLS else None
    d = procs.wait_for(doc, 15, interval_s=0.3, what="the web -> echo edge with every call")
    services = {s["name"]: s for s in d["services"]}
    assert set(services) == {"echo", "web"}
    echo = services["echo"]
    assert echo["requests"] >= CALLS and echo["rps"] > 0 and echo["success_rate"] == 1.0
    assert 0 < echo["p50_ms"] <= echo["p99_ms"] < 1000, echo
    assert services["web"]["requests"] == 0  # nobody calls web
    [edge] = d["edges"]
    assert edge["open_breakers"] == 0 and edge["success_rate"] == 1.0
    # The gRPC answer is the same data.
    topo = mesh.admin().Topology(pb.TopologyRequest(), timeout=5)
    assert {s.name: s.requests for s in topo.services}["echo"] >= CALLS


def test_the_picture_names_every_service(mesh: AdminMesh) -> None:
    status, headers, body = get(mesh.http, "/topology.svg")
    assert status == 200 and headers["content-type"] == "image/svg+xml", (status, body[:200])
    svg = body.decode()
    assert "<svg" in svg and ">echo<" in svg and ">web<" in svg
    assert "default-src 'none'" in headers["content-security-policy"]


def test_the_dashboard_answers_with_a_self_contained_page(mesh: AdminMesh) -> None:
    status, headers, body = get(mesh.http, "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert page.startswith("<!DOCTYPE html>") and "/api/topology" in page
    assert "/topology.svg" in page and "setInterval" in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assert headers["content-security-policy"] == DASHBOARD_CSP
    assert headers["cache-control"] == "no-store"


def test_unknown_paths_are_404_and_other_methods_405(mesh: AdminMesh) -> None:
    assert get(mesh.http, "/no-such-page")[0] == 404
    assert get(mesh.http, "/metrics/../admin")[0] == 404
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        status, headers, _ = get(mesh.http, "/metrics", method)
        assert status == 405 and headers["allow"] == "GET", method
    assert get(mesh.http, "/metrics?x=1")[0] == 200  # a query string is ignored


def test_an_admin_http_address_that_is_taken_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "control_plane.main", "--listen",
                            "127.0.0.1:0", "--bootstrap-listen", "127.0.0.1:0",
                            "--admin-http", f"127.0.0.1:{port}",
                            "--ca-dir", str(tmp_path / "ca"), "--data-dir",
                            str(tmp_path / "data")], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mesh-control-plane: error: cannot listen on") and str(port) in last


# ---------------------------------------------------------------------- in-process hardening
def topology() -> pb.TopologyResponse:
    return pb.TopologyResponse(services=[pb.TopologyService(name="order"),
                                         pb.TopologyService(name="payment")],
                               edges=[pb.TopologyEdge(source="order", destination="payment",
                                                      rps=1, success_rate=1, requests=3)],
                               window_s=60)


async def serve(render_svg: Callable[[str], bytes] | None = None) -> AdminHttpServer:
    server = AdminHttpServer(lambda: b"# metrics\n", "text/plain; version=0.0.4", topology,
                             render_svg=render_svg)
    await server.start("127.0.0.1", 0)
    return server


async def exchange(address: str, raw: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``raw`` and read until the server closes (b"" when it closed, or reset, without
    answering)."""
    host, port = procs.hostport(address)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_a_request_head_over_the_bound_gets_431() -> None:
    server = await serve()
    try:
        big = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (2 * http_admin.MAX_REQUEST_HEAD_BYTES)
        answer = await exchange(server.address, big + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        ok = await exchange(server.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"# metrics\n")
    finally:
        await server.stop()


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /a b HTTP/1.1\r\n\r\n", b"400"),
    (b"GET http://evil/ HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"\xff\xfe / HTTP/1.1\r\n\r\n", b"400"),
])
async def test_malformed_requests_get_a_clear_status(raw: bytes, status: bytes) -> None:
    server = await serve()
    try:
        answer = await exchange(server.address, raw)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:100]
    finally:
        await server.stop()


async def test_a_silent_client_is_dropped_and_the_cap_closes_extra_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_admin, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http_admin, "MAX_CONNECTIONS", 2)
    server = await serve()
    host, port = procs.hostport(server.address)
    try:
        idle = [await asyncio.open_connection(host, port) for _ in range(2)]
        await asyncio.sleep(0.1)  # let the server accept both
        extra = await exchange(server.address, b"GET / HTTP/1.1\r\n\r\n", timeout_s=0.4)
        assert extra == b""  # over the cap: closed at once, unanswered
        started = time.monotonic()
        for reader, writer in idle:
            assert await asyncio.wait_for(reader.read(), 3) == b""  # dropped, unanswered
            writer.close()
        assert time.monotonic() - started < 2
        ok = await exchange(server.address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")
    finally:
        await server.stop()


async def test_graphviz_missing_is_503_with_one_line() -> None:
    def missing(dot: str) -> bytes:
        raise RenderError("Graphviz is not installed ('dot' not found on PATH)")
    server = await serve(missing)
    try:
        answer = await exchange(server.address, b"GET /topology.svg HTTP/1.1\r\n\r\n")
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 ")
        assert body == b"cannot draw the topology: Graphviz is not installed ('dot' not found " \
                       b"on PATH)\n"
        dash = await exchange(server.address, b"GET / HTTP/1.1\r\n\r\n")
        assert dash.startswith(b"HTTP/1.1 200 ")  # the page still answers
    finally:
        await server.stop()


async def test_drawing_runs_off_the_event_loop_and_is_cached() -> None:
    calls: list[str] = []
    drawing = threading.Event()

    def slow(dot: str) -> bytes:
        calls.append(dot)
        drawing.set()
        time.sleep(0.6)
        return b"<svg>order payment</svg>"
    server = await serve(slow)
    try:
        first = asyncio.create_task(exchange(server.address, b"GET /topology.svg HTTP/1.1\r\n\r\n"))
        second = asyncio.create_task(exchange(server.address,
                                              b"GET /topology.svg HTTP/1.1\r\n\r\n"))
        await asyncio.to_thread(drawing.wait, 5)
        started = time.monotonic()
        metrics = await exchange(server.address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert metrics.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 0.4
        for answer in await asyncio.gather(first, second):
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"order payment</svg>")
        assert len(calls) == 1  # the second request waited for the first drawing
        again = await exchange(server.address, b"GET /topology.svg HTTP/1.1\r\n\r\n")
        assert again.endswith(b"order payment</svg>") and len(calls) == 1  # the same topology
    finally:
        await server.stop()
