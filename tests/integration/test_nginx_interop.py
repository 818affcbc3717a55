"""Interop with nginx as one of the two hops, both ways round:

1. grpc client → our client sidecar → mTLS → nginx (ssl http2, client cert required) →
   grpc_pass grpc:// → echo server;
2. grpc client → nginx (h2c) → grpc_pass grpcs:// (client cert, verified chain and name) →
   our echo sidecar's inbound → echo server.

nginx runs as one worker in the foreground (`-g 'daemon off;'`) with its prefix, pid, error
log and temp files under the test's tmp dir, and is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support.echo_server import FAIL_DETAIL
from tests.support.pki import CA, WorkloadCert, spiffe_id
from tests.support.procs import free_port, wait_for
from tests.support.sidecar import inbound_addr, outbound_addr

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(
        NGINX is None,
        reason="the nginx binary is not installed (`make install` installs nginx-light)",
    ),
]

MIB = 1024 * 1024


def nginx_conf(tmp: Path, server_block: str, upstream: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the tmp dir (0700)
    return f"""{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    client_max_body_size 0;
    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
{server_block}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[str, str], int]]:
    """Factory: nginx(server_block, upstream "host:port") -> the port it listens on (the block
    has `{port}` replaced). The process is stopped by PID at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def _start(server_block: str, upstream: str) -> int:
        tmp = tmp_path / f"nginx-{len(started)}"
        tmp.mkdir()
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, server_block.replace("{port}", str(port)), upstream))
        log = tmp / "stderr.log"
        logs.append(tmp / "error.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    NGINX,
                    "-p",
                    f"{tmp}/",
                    "-c",
                    str(conf),
                    "-e",
                    str(tmp / "error.log"),
                    "-g",
                    "daemon off;",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)

        def listening() -> bool:
            if proc.poll() is not None:
                errors = (
                    (tmp / "error.log").read_text(errors="replace")
                    if (tmp / "error.log").exists()
                    else ""
                )
                raise AssertionError(
                    f"nginx exited with {proc.returncode}: {log.read_text()} {errors}"
                )
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        try:
            wait_for(listening, timeout_s=10, what=f"nginx listening on {port}")
        except AssertionError:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited with {proc.returncode}: {log.read_text()}")
            raise
        return port

    yield _start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    for path in logs:  # shown by pytest when a test failed
        if path.exists():
            print(f"--- {path} ---\n{path.read_text(errors='replace')[-4000:]}")


def check_unary_and_stream(stub: echo_pb2_grpc.EchoStub, server_id: str) -> None:
    resp, call = stub.Unary.with_call(
        echo_pb2.EchoRequest(payload=b"hello"), metadata=[("x-tag", "t1")], timeout=10
    )
    assert resp.payload == b"hello" and resp.server_id == server_id
    assert dict(call.initial_metadata())["x-echo-tag"] == "t1"
    assert dict(call.trailing_metadata())["x-trailer"] == "done"

    call = stub.ServerStream(echo_pb2.EchoRequest(payload=b"s", count=5), timeout=10)
    responses = list(call)
    assert [r.payload for r in responses] == [b"s"] * 5
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.trailing_metadata())["x-trailer"] == "done"


def test_our_sidecar_calls_nginx_over_mtls(pki: CA, echo_server, sidecar, nginx, grpc_channel):
    """client → our outbound sidecar → mTLS → nginx (ssl_verify_client on) → echo server."""
    srv = echo_server("echo-behind-nginx")
    nginx_cert: WorkloadCert = pki.issue_workload("echo")
    port = nginx(
        f"""        listen 127.0.0.1:{{port}} ssl http2;
        ssl_certificate {nginx_cert.cert};
        ssl_certificate_key {nginx_cert.key};
        ssl_client_certificate {pki.ca_path};
        ssl_verify_client on;
        location / {{ grpc_pass grpc://backend; }}""",
        f"127.0.0.1:{srv.port}",
    )
    cs = sidecar(
        service="client",
        tls=pki.issue_workload("client"),
        clusters={"echo": [(f"127.0.0.1:{port}", spiffe_id("echo"))]},
    )
    host, out_port = outbound_addr(cs)
    stub = echo_pb2_grpc.EchoStub(
        grpc_channel(f"{host}:{out_port}", options=[("grpc.default_authority", "echo")])
    )

    check_unary_and_stream(stub, "echo-behind-nginx")
    big = bytes(range(256)) * (MIB // 256)
    resp = stub.Unary(echo_pb2.EchoRequest(payload=big), timeout=20)
    assert resp.payload == big
    resp = stub.Unary(echo_pb2.EchoRequest(payload=b"small", response_bytes=MIB), timeout=20)
    assert len(resp.payload) == MIB


def test_nginx_calls_our_sidecar_over_mtls(pki: CA, echo_server, sidecar, nginx, grpc_channel):
    """client → nginx (h2c) → grpc_pass grpcs:// (client cert "client") → our echo sidecar."""
    srv = echo_server("echo-behind-sidecar")
    es = sidecar(service="echo", tls=pki.issue_workload("echo"), app_port=srv.port)
    host, in_port = inbound_addr(es)
    client_cert = pki.issue_workload("client")
    port = nginx(
        f"""        listen 127.0.0.1:{{port}} http2;
        location / {{
            grpc_pass grpcs://backend;
            grpc_ssl_certificate {client_cert.cert};
            grpc_ssl_certificate_key {client_cert.key};
            grpc_ssl_trusted_certificate {pki.ca_path};
            grpc_ssl_verify on;
            grpc_ssl_name echo.mesh.local;
        }}""",
        f"{host}:{in_port}",
    )
    stub = echo_pb2_grpc.EchoStub(grpc_channel(f"127.0.0.1:{port}"))

    check_unary_and_stream(stub, "echo-behind-sidecar")
    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(
            echo_pb2.EchoRequest(payload=b"x", fail_code=5, fail_message="no such thing"),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such thing"
    assert dict(err.value.trailing_metadata())["x-fail-detail"] == FAIL_DETAIL

    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.ServerStream(
                echo_pb2.EchoRequest(payload=b"s", count=2, fail_code=9, fail_message="halfway"),
                timeout=10,
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "halfway"
