"""SIGTERM drains a sidecar: it stops accepting, lets the calls in flight finish (up to
--drain-timeout-s), then exits 0; calls still running at the deadline fail, they never hang."""

from __future__ import annotations

import signal
import socket
import time

import grpc
import pytest

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import h2probe
from tests.support.pki import CA, spiffe_id
from tests.support.procs import wait_for
from tests.support.sidecar import inbound_addr, outbound_addr

N_CALLS = 4


def refuses_connections(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=1):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture
def start_mesh(pki: CA, echo_server, sidecar, grpc_channel):
    """Factory: (echo_server, echo_sidecar, stub through a client sidecar), given the echo
    sidecar's drain timeout."""

    def _start(drain_timeout_s: float):
        srv = echo_server("echo-drain")
        es = sidecar(
            service="echo",
            tls=pki.issue_workload("echo"),
            app_port=srv.port,
            extra_args=["--drain-timeout-s", str(drain_timeout_s)],
        )
        host, port = inbound_addr(es)
        cs = sidecar(
            service="client",
            tls=pki.issue_workload("client"),
            clusters={"echo": [(f"{host}:{port}", spiffe_id("echo"))]},
        )
        out_host, out_port = outbound_addr(cs)
        ch = grpc_channel(f"{out_host}:{out_port}", options=[("grpc.default_authority", "echo")])
        stub = echo_pb2_grpc.EchoStub(ch)
        assert stub.Unary(echo_pb2.EchoRequest(payload=b"warm"), timeout=5).payload == b"warm"
        return srv, es, stub

    return _start


def start_slow_calls(es, stub, sleep_ms: int, timeout_s: float) -> list[grpc.Future]:
    calls = [
        stub.Unary.future(
            echo_pb2.EchoRequest(payload=b"slow-%d" % i, sleep_ms=sleep_ms), timeout=timeout_s
        )
        for i in range(N_CALLS)
    ]
    wait_for(
        lambda: h2probe.stats(es)["inbound"]["active_calls"] == N_CALLS,
        timeout_s=5,
        what=f"{N_CALLS} calls in flight at the echo sidecar",
    )
    return calls


def test_sigterm_finishes_calls_in_flight_refuses_new_connections_and_exits_0(start_mesh):
    drain_timeout_s = 8.0
    _, es, stub = start_mesh(drain_timeout_s)
    calls = start_slow_calls(es, stub, sleep_ms=800, timeout_s=15)
    t0 = time.monotonic()
    es.signal(signal.SIGTERM)

    wait_for(
        lambda: refuses_connections(inbound_addr(es)),
        timeout_s=2,
        interval_s=0.01,
        what="the inbound listener to stop accepting",
    )
    assert not any(c.done() for c in calls) and es.alive(), "the calls should still be in flight"

    for i, c in enumerate(calls):
        resp = c.result(timeout=10)
        assert resp.payload == b"slow-%d" % i and resp.server_id == "echo-drain"
    rc = es.popen.wait(timeout=drain_timeout_s + 2)
    elapsed = time.monotonic() - t0
    assert rc == 0, es.log_tail()
    assert elapsed < drain_timeout_s, f"exited after {elapsed:.2f}s: it waited for nothing"


def test_drain_timeout_cuts_calls_that_run_too_long_and_exits_0_promptly(start_mesh):
    srv, es, stub = start_mesh(0.5)
    calls = start_slow_calls(es, stub, sleep_ms=5000, timeout_s=20)
    t0 = time.monotonic()
    es.signal(signal.SIGTERM)
    rc = es.popen.wait(timeout=10)
    exited_s = time.monotonic() - t0
    assert rc == 0, es.log_tail()
    assert exited_s < 3, f"took {exited_s:.2f}s to exit with a 0.5s drain timeout"

    for c in calls:
        remaining = max(0.1, t0 + 4 - time.monotonic())
        err = c.exception(timeout=remaining)  # raises FutureTimeoutError if the call hangs
        assert err is not None, "a call cut by the drain timeout reported success"
        assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), err
    assert "drain timeout" in es.log_text()
    srv.proc.kill()  # its handlers still sleep; a graceful stop would wait for them


def test_idle_sidecar_exits_0_without_waiting_for_the_drain_timeout(pki: CA, echo_server, sidecar):
    srv = echo_server("echo-idle")
    es = sidecar(
        service="echo",
        tls=pki.issue_workload("echo"),
        app_port=srv.port,
        extra_args=["--drain-timeout-s", "30"],
    )
    t0 = time.monotonic()
    es.signal(signal.SIGTERM)
    assert es.popen.wait(timeout=10) == 0, es.log_tail()
    assert time.monotonic() - t0 < 3
