"""Rotating certificates loses no request: new files (same CA) swapped in atomically and
reloaded (POST /reload-certs, SIGHUP, or the file-mtime poll) are used by new connections
while calls keep flowing; a broken file is refused and the old certificate stays in use."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import h2probe
from tests.support.pki import CA, WorkloadCert, spiffe_id
from tests.support.procs import wait_for
from tests.support.sidecar import inbound_addr, outbound_addr


def live_copy(cert: WorkloadCert, dst_dir: Path, name: str) -> WorkloadCert:
    """Copy `cert` to files under `dst_dir` that a sidecar is configured with (and we rotate)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    live = WorkloadCert(cert=dst_dir / f"{name}.pem", key=dst_dir / f"{name}-key.pem", ca=cert.ca)
    shutil.copyfile(cert.cert, live.cert)
    shutil.copyfile(cert.key, live.key)
    os.chmod(live.key, 0o600)
    return live


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def install(new: WorkloadCert, live: WorkloadCert) -> None:
    """Replace the live key and certificate with `new`'s, each file atomically."""
    atomic_write(live.key, new.key.read_bytes())
    atomic_write(live.cert, new.cert.read_bytes())


class Load(threading.Thread):
    """Unary calls in a bounded loop (until stopped, `max_s` or `max_calls`), recording failures."""

    def __init__(
        self, stub: echo_pb2_grpc.EchoStub, max_s: float = 15, max_calls: int = 3000
    ) -> None:
        super().__init__(daemon=True, name="load")
        self.stub = stub
        self.max_s = max_s
        self.max_calls = max_calls
        self.ok = 0
        self.failures: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        req = echo_pb2.EchoRequest(payload=b"rotate-me" * 8)
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            if self.ok + len(self.failures) >= self.max_calls:
                break
            try:
                resp = self.stub.Unary(req, timeout=5)
                if resp.payload != req.payload:
                    self.failures.append(f"wrong payload {resp.payload[:20]!r}")
                else:
                    self.ok += 1
            except grpc.RpcError as e:
                self.failures.append(f"{e.code()}: {e.details()}")

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=20)
        assert not self.is_alive(), "load thread hung"


@pytest.fixture
def mesh(pki: CA, echo_server, sidecar, grpc_channel, tmp_path: Path):
    """echo server ← echo sidecar ← client sidecar (both with rotatable cert files, no mtime
    polling) and a probe endpoint that records the client certificate the client sidecar shows."""
    srv = echo_server("echo-rot")
    echo_live = live_copy(pki.issue_workload("echo"), tmp_path / "live", "echo")
    client_live = live_copy(pki.issue_workload("client"), tmp_path / "live", "client")
    es = sidecar(
        service="echo", tls=echo_live, app_port=srv.port, extra_args=["--cert-poll-s", "0"]
    )
    recorder = h2probe.ClientCertRecorder(pki.issue_workload("probe"))
    host, port = inbound_addr(es)
    cs = sidecar(
        service="client",
        tls=client_live,
        clusters={
            "echo": [(f"{host}:{port}", spiffe_id("echo"))],
            "probe": [(recorder.address, spiffe_id("probe"))],
        },
        extra_args=["--cert-poll-s", "0"],
    )
    out_host, out_port = outbound_addr(cs)

    def stub(authority: str) -> echo_pb2_grpc.EchoStub:
        ch = grpc_channel(f"{out_host}:{out_port}", options=[("grpc.default_authority", authority)])
        return echo_pb2_grpc.EchoStub(ch)

    yield {
        "es": es,
        "cs": cs,
        "echo_live": echo_live,
        "client_live": client_live,
        "recorder": recorder,
        "stub": stub,
    }
    recorder.close()


def raw_ctx(pki: CA):
    return h2probe.client_context(pki.ca_path, pki.issue_workload("raw-client"))


def probe_client_serial(mesh) -> int:
    """Make the client sidecar dial the probe endpoint; return the client cert serial it showed."""
    before = len(mesh["recorder"].seen())
    with pytest.raises(grpc.RpcError):  # the probe closes after the handshake: the call fails
        mesh["stub"]("probe").Unary(echo_pb2.EchoRequest(payload=b"p"), timeout=5)
    seen = wait_for(lambda: mesh["recorder"].seen()[before:], timeout_s=5, what="probe handshake")
    return seen[-1]


def test_rotation_under_load_loses_no_call_and_new_connections_use_new_certs(pki: CA, mesh):
    es, cs = mesh["es"], mesh["cs"]
    ctx = raw_ctx(pki)
    old_echo = h2probe.cert_serial(mesh["echo_live"].cert)
    old_client = h2probe.cert_serial(mesh["client_live"].cert)
    assert h2probe.presented_serial(inbound_addr(es), ctx) == old_echo
    assert probe_client_serial(mesh) == old_client

    load = Load(mesh["stub"]("echo"))
    load.start()
    try:
        wait_for(lambda: load.ok >= 50 or load.failures, timeout_s=10, what="load to get going")
        assert not load.failures, load.failures[:5]

        new_echo, new_client = pki.issue_workload("echo"), pki.issue_workload("client")
        install(new_echo, mesh["echo_live"])
        install(new_client, mesh["client_live"])
        status, body = h2probe.admin_request(es, "POST", "/reload-certs")
        assert status == 200 and body["reloaded"] is True, (status, body)
        cs.signal(signal.SIGHUP)
        wait_for(
            lambda: h2probe.stats(cs)["tls"]["reloads"] >= 1,
            timeout_s=5,
            what="client sidecar SIGHUP reload",
        )
        ok_at_reload = load.ok

        # New connections use the new certificates, in both directions.
        assert h2probe.presented_serial(inbound_addr(es), ctx) == h2probe.cert_serial(new_echo.cert)
        assert probe_client_serial(mesh) == h2probe.cert_serial(new_client.cert)

        # Traffic keeps flowing after the reload too.
        wait_for(
            lambda: load.ok >= ok_at_reload + 100 or not load.is_alive(),
            timeout_s=10,
            what="calls after the reload",
        )
        assert load.is_alive(), "the load loop hit its bound before the rotation finished"
    finally:
        load.finish()
    assert not load.failures, f"{len(load.failures)} failed calls, e.g. {load.failures[:5]}"
    assert load.ok >= ok_at_reload + 100
    assert h2probe.stats(es)["tls"]["reloads"] >= 1
    assert h2probe.stats(es)["tls"]["cert_not_after"] is not None
    assert h2probe.stats(es)["inbound"]["calls"]["by_status"] == {"OK": load.ok}, h2probe.stats(es)[
        "inbound"
    ]
    # A new client sidecar connection (through the new certs on both ends) is served as well.
    assert (
        mesh["stub"]("echo").Unary(echo_pb2.EchoRequest(payload=b"after"), timeout=5).payload
        == b"after"
    )


def test_changed_files_are_picked_up_by_the_mtime_poll(
    pki: CA, echo_server, sidecar, tmp_path: Path
):
    srv = echo_server("echo-poll")
    live = live_copy(pki.issue_workload("echo"), tmp_path / "live", "echo")
    es = sidecar(service="echo", tls=live, app_port=srv.port, extra_args=["--cert-poll-s", "0.2"])
    ctx = raw_ctx(pki)
    assert h2probe.presented_serial(inbound_addr(es), ctx) == h2probe.cert_serial(live.cert)
    new = pki.issue_workload("echo")
    install(new, live)
    want = h2probe.cert_serial(new.cert)
    wait_for(
        lambda: h2probe.presented_serial(inbound_addr(es), ctx) == want,
        timeout_s=10,
        what="the new certificate on a new connection",
    )
    assert h2probe.stats(es)["tls"]["reloads"] >= 1


def test_broken_cert_file_is_refused_and_the_old_cert_keeps_serving(pki: CA, mesh):
    es = mesh["es"]
    ctx = raw_ctx(pki)
    live = mesh["echo_live"]
    old_serial = h2probe.cert_serial(live.cert)
    good_pem = live.cert.read_bytes()

    load = Load(mesh["stub"]("echo"), max_s=15, max_calls=3000)
    load.start()
    try:
        wait_for(lambda: load.ok >= 20 or load.failures, timeout_s=10, what="load to get going")
        atomic_write(
            live.cert,
            b"-----BEGIN CERTIFICATE-----\ngarbage, not base64!\n-----END CERTIFICATE-----\n",
        )
        status, body = h2probe.admin_request(es, "POST", "/reload-certs")
        assert status == 500 and body["reloaded"] is False and body["error"], (status, body)
        es.signal(signal.SIGHUP)  # refused the same way; the process stays up
        wait_for(
            lambda: "SIGHUP" in es.log_text(), timeout_s=5, what="the SIGHUP reload to be refused"
        )
        assert es.alive()
        ok_at_refusal = load.ok
        assert h2probe.presented_serial(inbound_addr(es), ctx) == old_serial
        wait_for(
            lambda: load.ok >= ok_at_refusal + 50 or not load.is_alive(),
            timeout_s=10,
            what="calls after the refused reload",
        )
        assert load.is_alive(), "the load loop hit its bound too early"
    finally:
        load.finish()
    assert not load.failures, f"{len(load.failures)} failed calls, e.g. {load.failures[:5]}"
    st = h2probe.stats(es)
    assert st["tls"]["reloads"] == 0, st["tls"]

    # A fixed file is accepted afterwards.
    new = pki.issue_workload("echo")
    install(new, live)
    status, body = h2probe.admin_request(es, "POST", "/reload-certs")
    assert status == 200 and body["reloaded"] is True, (status, body)
    assert (
        h2probe.presented_serial(inbound_addr(es), ctx)
        == h2probe.cert_serial(new.cert)
        != old_serial
    )
    assert good_pem != live.cert.read_bytes()
