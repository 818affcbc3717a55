"""``sidecar.rpc`` (the sidecar's own gRPC client) and ``sidecar.health`` against real grpcio
servers on loopback: unary and streaming calls, status and trailers, deadlines, limits, flow
control, reconnection, TLS with the host name checked; and the sidecar modules that talk to
the control plane load no grpcio."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_common.bootstrap import HostPort
from sidecar.health import AppHealth
from sidecar.rpc import Channel, Code, RpcError, binary_header, client_tls
from sidecar.tls import TlsFiles
from tests.support.pki import make_ca

pytestmark = pytest.mark.timeout(60)

Req = health_pb2.HealthCheckRequest
Resp = health_pb2.HealthCheckResponse
ECHO = "/test.Echo/Unary"
ECHO_STREAM = "/test.Echo/Stream"
REPO = Path(__file__).resolve().parents[2]


def _echo_handlers() -> grpc.GenericRpcHandler:
    """``/test.Echo/*`` on HealthCheckRequest/Response: ``Unary`` answers the request's
    SERVING, or fails as ``service`` says (``fail:CODE:msg``), sleeps first (``sleep:S``) or
    sets a binary trailer (``mac``);
    ``Stream`` answers each request with SERVING and ends OK, or fails on ``fail``."""

    async def unary(req: Req, ctx: grpc.aio.ServicerContext) -> Resp:
        what = req.service
        if what.startswith("fail:"):
            _, code, msg = what.split(":", 2)
            await ctx.abort(grpc.StatusCode[code], msg)
        if what.startswith("sleep:"):
            await asyncio.sleep(float(what[6:]))
        if what == "mac":
            ctx.set_trailing_metadata((("mesh-join-mac-bin", b"\x00\x01\xfe\xff"),))
        return Resp(status=Resp.SERVING)

    async def stream(reqs: AsyncIterator[Req], ctx: grpc.aio.ServicerContext
                     ) -> AsyncIterator[Resp]:
        async for req in reqs:
            if req.service == "fail":
                await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no\nway")
            yield Resp(status=Resp.SERVING)

    ser = Resp.SerializeToString
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, Req.FromString, ser),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, Req.FromString, ser),
    })


async def _big_handler_server(port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A server whose ``/test.Big/Get`` answers raw bytes of the length asked for."""
    async def get(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return b"x" * int(req.decode())

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Big", {
        "Get": grpc.unary_unary_rpc_method_handler(get, lambda b: b, lambda b: b)})])
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


class Raw:
    """A request message given as its bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> Raw:  # noqa: N802
        return cls(data)


async def _server(tls: grpc.ServerCredentials | None = None, port: int = 0
                  ) -> tuple[grpc.aio.Server, int, health_async.HealthServicer]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_generic_rpc_handlers([_echo_handlers()])
    address = f"127.0.0.1:{port}"
    port = (server.add_secure_port(address, tls) if tls is not None
            else server.add_insecure_port(address))
    await server.start()
    return server, port, health


async def test_unary_ok_error_status_and_trailers() -> None:
    server, port, _ = await _server()
    try:
        async with Channel(f"127.0.0.1:{port}") as ch:
            assert (await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)).status == \
                Resp.SERVING
            with pytest.raises(RpcError) as err:
                await ch.unary(ECHO, Req(service="fail:PERMISSION_DENIED:not you%, línea"),
                               Resp, timeout_s=5)
            assert err.value.code == Code.PERMISSION_DENIED
            assert err.value.details == "not you%, línea"
            _, trailers = await ch.unary_with_trailers(ECHO, Req(service="mac"), Resp,
                                                       timeout_s=5)
            assert trailers is not None
            assert binary_header(trailers.lookup("mesh-join-mac-bin")) == b"\x00\x01\xfe\xff"
            with pytest.raises(RpcError) as err:
                await ch.unary("/test.Echo/Nope", Req(), Resp, timeout_s=5)
            assert err.value.code == Code.UNIMPLEMENTED
            # every call so far on one connection
            assert ch.connections_made == 1
    finally:
        await server.stop(0)


async def test_deadline_is_enforced_and_the_channel_stays_usable() -> None:
    server, port, _ = await _server()
    try:
        async with Channel(f"127.0.0.1:{port}") as ch:
            started = time.monotonic()
            with pytest.raises(RpcError) as err:
                await ch.unary(ECHO, Req(service="sleep:5"), Resp, timeout_s=0.3)
            assert err.value.code == Code.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2.5
            assert (await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)).status == \
                Resp.SERVING
    finally:
        await server.stop(0)


async def test_oversized_response_fails_that_call_only() -> None:
    server, port = await _big_handler_server()
    try:
        async with Channel(f"127.0.0.1:{port}", max_message_bytes=1 << 20) as ch:
            ok = await ch.unary("/test.Big/Get", Raw(b"1000000"), Raw, timeout_s=10)
            assert len(ok.data) == 1_000_000
            with pytest.raises(RpcError) as err:
                await ch.unary("/test.Big/Get", Raw(str(3 << 20).encode()), Raw, timeout_s=10)
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert "over the 1048576 limit" in err.value.details
            ok = await ch.unary("/test.Big/Get", Raw(b"5000"), Raw, timeout_s=10)
            assert len(ok.data) == 5000
    finally:
        await server.stop(0)


async def test_large_messages_cross_flow_control_both_ways() -> None:
    """8 MiB messages, over any window either side starts with, both ways."""
    server, port = await _big_handler_server()
    try:
        async with Channel(f"127.0.0.1:{port}") as ch:
            body = str(8 << 20).encode()
            got = await ch.unary("/test.Big/Get", Raw(body + b" " * (8 << 20)), Raw,
                                 timeout_s=20)
            assert len(got.data) == 8 << 20
    finally:
        await server.stop(0)


async def test_stream_both_ways_and_its_end() -> None:
    server, port, _ = await _server()
    try:
        async with Channel(f"127.0.0.1:{port}") as ch:
            call = await ch.open_stream(ECHO_STREAM, Resp)
            for _ in range(50):
                await call.write(Req(service="x"))
            for _ in range(50):
                assert (await call.read()).status == Resp.SERVING  # type: ignore[union-attr]
            await call.done_writing()
            assert await call.read() is None  # ended OK
            call = await ch.open_stream(ECHO_STREAM, Resp)
            await call.write(Req(service="fail"))
            with pytest.raises(RpcError) as err:
                await call.read()
            assert err.value.code == Code.PERMISSION_DENIED
            assert err.value.details == "no way"  # one line
            # the watch stream of the health service: the server pushes a change
            health_call = await ch.open_stream("/grpc.health.v1.Health/Watch", Resp)
            await health_call.write(Req(service=""))
            assert (await health_call.read()).status == Resp.SERVING  # type: ignore[union-attr]
            health_call.cancel()
            with pytest.raises(RpcError) as err:
                await health_call.read()
            assert err.value.code == Code.CANCELLED
    finally:
        await server.stop(0)


async def test_unreachable_then_reconnects_after_restart() -> None:
    server, port, _ = await _server()
    ch = Channel(f"127.0.0.1:{port}", connect_timeout_s=2)
    try:
        await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)
        call = await ch.open_stream(ECHO_STREAM, Resp)
        await server.stop(0)
        with pytest.raises(RpcError) as err:
            await call.read()
        assert err.value.code in (Code.UNAVAILABLE, Code.CANCELLED)
        with pytest.raises(RpcError) as err:
            await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)
        assert err.value.code == Code.UNAVAILABLE
        assert "cannot connect" in err.value.details
        server, _, _ = await _server(port=port)
        assert (await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)).status == \
            Resp.SERVING
        assert ch.connections_made == 2
    finally:
        await ch.close()
        await server.stop(0)


def _tls(tmp_path: Path) -> tuple[grpc.ServerCredentials, TlsFiles, TlsFiles]:
    """Server credentials for 127.0.0.1 and client files: one of the same CA, one not."""
    ca = make_ca(tmp_path / "ca")
    server = ca.issue_workload("control-plane")
    client = ca.issue_workload("web")
    creds = grpc.ssl_server_credentials(
        [(server.key.read_bytes(), server.cert.read_bytes())],
        root_certificates=ca.ca_path.read_bytes(), require_client_auth=True)
    other = make_ca(tmp_path / "other", name="other-ca")
    stranger = other.issue_workload("web")
    return (creds, TlsFiles(cert=str(client.cert), key=str(client.key), ca=str(ca.ca_path)),
            TlsFiles(cert=str(stranger.cert), key=str(stranger.key), ca=str(other.ca_path)))


async def test_mtls_with_the_host_checked(tmp_path: Path) -> None:
    creds, good, stranger = _tls(tmp_path)
    server, port, _ = await _server(tls=creds)
    try:
        async with Channel(f"127.0.0.1:{port}", tls=client_tls(good)) as ch:
            assert (await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)).status == \
                Resp.SERVING
        async with Channel(f"127.0.0.1:{port}", tls=client_tls(stranger)) as ch:
            with pytest.raises(RpcError) as err:
                await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)
            assert err.value.code == Code.UNAVAILABLE
            assert "certificate verify failed" in err.value.details
        async with Channel(f"127.0.0.1:{port}", tls=client_tls(good),
                           server_hostname="cp.example.com") as ch:
            with pytest.raises(RpcError) as err:
                await ch.unary(ECHO, Req(service="ok"), Resp, timeout_s=5)
            assert err.value.code == Code.UNAVAILABLE
            assert "cp.example.com" in err.value.details
    finally:
        await server.stop(0)


async def _poll(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_app_health_follows_the_app() -> None:
    server, port, health = await _server()
    seen: list[str] = []
    app = AppHealth(HostPort("127.0.0.1", port), "grpc", interval_s=0.05)
    app.on_change = seen.append
    task = asyncio.create_task(app.run())
    try:
        await health.set("", Resp.SERVING)
        assert await app.first_check() in ("SERVING", "UNKNOWN", "SERVICE_UNKNOWN")
        await _poll(lambda: app.status == "SERVING")
        await health.set("", Resp.NOT_SERVING)
        await _poll(lambda: app.status == "NOT_SERVING")
        await server.stop(0)
        await _poll(lambda: app.status == "UNREACHABLE")
        assert app.last_error and app.last_error.startswith("UNAVAILABLE")
        assert seen[-3:] == ["SERVING", "NOT_SERVING", "UNREACHABLE"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(0)


async def test_app_health_without_the_health_service_falls_back_to_tcp() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_echo_handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = AppHealth(HostPort("127.0.0.1", port), "grpc", interval_s=0.05)
    try:
        assert await app.check_once() == "SERVING"
        assert app.method == "tcp"
    finally:
        await server.stop(0)


def test_control_plane_clients_load_no_grpcio() -> None:
    code = ("import sys, json; import sidecar.rpc, sidecar.discovery, sidecar.health, "
            "sidecar.dynamic, sidecar.main; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'grpc' or "
            "m.startswith(('grpc.', 'grpc._cython', 'cryptography', 'opentelemetry.sdk')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == []
