"""A sidecar's own observability with real processes: ``/metrics`` (Prometheus text) and the
JSON-lines access log, on both sides of a call.

    grpcio channel ──h2c──▶ sidecar "client" (outbound, --access-log)
                   ──mTLS──▶ sidecar "echo" (inbound, --access-log) ──h2c──▶ echo server

The module shares one such mesh; the calls are made once, by the fixture.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import procs
from tests.support.pki import CA, spiffe_id
from tests.support.sidecar import REPO_ROOT, admin_addr, inbound_addr, outbound_addr, start_sidecar

pytestmark = pytest.mark.timeout(60)

UNARY = "/meshtest.Echo/Unary"
MISSING = "/meshtest.Echo/NoSuchMethod"
N_OK = 5
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _addr(hp: tuple[str, int]) -> str:
    return f"{hp[0]}:{hp[1]}"


@dataclass
class World:
    client_sc: procs.Proc
    echo_sc: procs.Proc
    client_log: Path
    echo_log: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: CA) -> Iterator[World]:
    d = tmp_path_factory.mktemp("observability")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    started: list[procs.Proc] = []
    try:
        echo = procs.start([sys.executable, "-m", "tests.support.echo_server", "--port", "0",
                            "--server-id", "echo-1"], env=env, cwd=REPO_ROOT, log_dir=d,
                           ready_timeout_s=20)
        started.append(echo)
        echo_log, client_log = d / "echo-access.log", d / "client-access.log"
        echo_sc = start_sidecar(d, service="echo", tls=pki.issue_workload("echo"),
                                app_port=int(echo.ready["port"]),
                                extra_args=["--access-log", str(echo_log)])
        started.append(echo_sc)
        client_sc = start_sidecar(d, service="client", tls=pki.issue_workload("client"),
                                  clusters={"echo": [(_addr(inbound_addr(echo_sc)),
                                                      spiffe_id("echo"))]},
                                  extra_args=["--access-log", str(client_log)])
        started.append(client_sc)
        with grpc.insecure_channel(_addr(outbound_addr(client_sc)),
                                   options=[("grpc.default_authority", "echo")]) as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            for i in range(N_OK):
                stub.Unary(echo_pb2.EchoRequest(payload=b"x" * i), timeout=10)
            missing = ch.unary_unary(MISSING, request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                missing(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        yield World(client_sc, echo_sc, client_log, echo_log)
    finally:
        for p in reversed(started):
            p.stop(timeout_s=5)


def scrape(proc: procs.Proc) -> tuple[str, dict[str, Any]]:
    """(Content-Type, families by name) of the sidecar's ``/metrics``."""
    url = f"http://{_addr(admin_addr(proc))}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        ctype = resp.headers["Content-Type"]
        text = resp.read().decode()
    return ctype, {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    """The value of the one sample named ``sample`` with (at least) ``labels``; 0 if none."""
    family = re.sub(r"_(total|count|sum|bucket)$", "", sample)
    hits = [s.value for s in fams[family].samples
            if s.name == sample and labels.items() <= s.labels.items()]
    assert len(hits) <= 1, (sample, labels, hits)
    return hits[0] if hits else 0.0


def requests(fams: dict[str, Any], direction: str, method: str, code: str,
             sample: str = "mesh_requests_total") -> float:
    return value(fams, sample, direction=direction, source="client", destination="echo",
                 method=method, grpc_code=code)


def test_both_sidecars_count_the_calls_by_method_and_code(world: World) -> None:
    # The metrics are counted when the relay ends a call, a moment after the client returns.
    procs.wait_for(lambda: requests(scrape(world.echo_sc)[1], "inbound", UNARY, "OK") == N_OK,
                   10, what="the echo sidecar's inbound count")
    for proc, direction in ((world.client_sc, "outbound"), (world.echo_sc, "inbound")):
        ctype, fams = scrape(proc)
        assert ctype == "text/plain; version=0.0.4; charset=utf-8"
        assert requests(fams, direction, UNARY, "OK") == N_OK, direction
        assert requests(fams, direction, UNARY, "OK",
                        "mesh_request_duration_seconds_count") == N_OK
        assert requests(fams, direction, UNARY, "OK",
                        "mesh_request_duration_seconds_sum") > 0
        inf = value(fams, "mesh_request_duration_seconds_bucket", direction=direction,
                    method=UNARY, grpc_code="OK", le="+Inf")
        assert inf == N_OK
        # A method nobody serves folds into "other": it never becomes a label of its own.
        assert requests(fams, direction, "other", "UNIMPLEMENTED") == 1, direction
        assert not [s for s in fams["mesh_requests"].samples
                    if s.labels["method"] == MISSING]
        assert value(fams, "mesh_active_calls", direction=direction) == 0
        assert value(fams, "mesh_certificate_expiry_timestamp_seconds") > time.time()
        assert [s.labels for s in fams["mesh_snapshot_info"].samples]
    _, client = scrape(world.client_sc)
    # The client's breaker view of its one endpoint, CLOSED.
    endpoint = _addr(inbound_addr(world.echo_sc))
    assert value(client, "mesh_breaker_state", destination="echo", endpoint=endpoint,
                 state="CLOSED") == 1
    assert value(client, "mesh_outlier_ejections_total", destination="echo",
                 endpoint=endpoint) == 0
    _, echo = scrape(world.echo_sc)
    assert value(echo, "mesh_tls_handshakes_total") >= 1


def _lines(path: Path, n: int) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]] | None:
        if not path.exists():
            return None
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        return lines if len(lines) >= n else None
    return procs.wait_for(read, 10, what=f"{n} lines in {path.name}")


FIELDS = {"time", "direction", "source", "destination", "method", "status", "latency_ms",
          "attempts", "endpoint", "trace_id", "reason", "peer"}


def test_each_sidecar_writes_one_access_log_line_per_call(world: World) -> None:
    echo_addr = _addr(inbound_addr(world.echo_sc))
    for path, direction in ((world.client_log, "outbound"), (world.echo_log, "inbound")):
        lines = _lines(path, N_OK + 1)
        assert len(lines) == N_OK + 1, lines
        for line in lines:
            assert set(line) == FIELDS
            assert RFC3339_MS.match(line["time"]), line
            assert (line["direction"], line["source"], line["destination"]) == (
                direction, "client", "echo")
            assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
            assert isinstance(line["trace_id"], str) and isinstance(line["reason"], str)
            if direction == "outbound":
                assert (line["attempts"], line["endpoint"], line["peer"]) == (1, echo_addr, "")
            else:
                assert line["peer"] == spiffe_id("client") and line["endpoint"] == ""
        assert [(x["method"], x["status"]) for x in lines] == (
            [(UNARY, "OK")] * N_OK + [(MISSING, "UNIMPLEMENTED")])
