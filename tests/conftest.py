"""Shared fixtures: a test PKI, echo servers, sidecars and gRPC channels.

Every process a fixture starts is stopped (by PID: SIGTERM, then SIGKILL) at the fixture's
teardown; a session-level safety net stops anything `tests.support.procs.start` left running.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support import procs
from tests.support.pki import CA, make_ca
from tests.support.sidecar import REPO_ROOT, start_sidecar


@dataclass(frozen=True)
class EchoServer:
    """A running `tests.support.echo_server` process."""

    proc: procs.Proc
    port: int
    server_id: str

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT' (plaintext h2c)."""
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10) -> int:
        return self.proc.stop(timeout_s=timeout_s)


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes() -> Iterator[None]:
    yield
    procs.stop_all(timeout_s=5)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CA:
    """One ECDSA P-256 CA for the session: `pki.issue_workload("echo")` -> WorkloadCert."""
    return make_ca(tmp_path_factory.mktemp("pki"), name="mesh-ca", days=1)


def _repo_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[Callable[..., EchoServer]]:
    """Factory: `echo_server(server_id="echo-1", max_message_bytes=None, port=0) -> EchoServer`."""
    started: list[procs.Proc] = []

    def _start(
        server_id: str = "echo",
        *,
        max_message_bytes: int | None = None,
        port: int = 0,
        ready_timeout_s: float = 20,
    ) -> EchoServer:
        cmd = [sys.executable, "-m", "tests.support.echo_server", "--port", str(port), "--server-id", server_id]
        if max_message_bytes is not None:
            cmd += ["--max-message-bytes", str(max_message_bytes)]
        proc = procs.start(cmd, env=_repo_env(), ready_timeout_s=ready_timeout_s, cwd=REPO_ROOT, log_dir=tmp_path)
        started.append(proc)
        return EchoServer(proc=proc, port=int(proc.ready["port"]), server_id=server_id)

    yield _start
    for p in started:
        p.stop(timeout_s=5)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Callable[..., procs.Proc]]:
    """Factory with start_sidecar's keyword arguments (tmpdir is the test's tmp_path):
    `sidecar(service="echo", tls=pki.issue_workload("echo"), app_port=srv.port, clusters={...})`."""
    started: list[procs.Proc] = []

    def _start(**kwargs) -> procs.Proc:
        proc = start_sidecar(kwargs.pop("tmpdir", tmp_path), **kwargs)
        started.append(proc)
        return proc

    yield _start
    for p in started:
        p.stop(timeout_s=5)


@pytest.fixture
def grpc_channel() -> Iterator[Callable[..., grpc.Channel]]:
    """Factory: `grpc_channel("127.0.0.1:P", options=(), credentials=None)`; closed at teardown.
    Insecure unless `credentials` (grpc.ssl_channel_credentials(...)) is given."""
    channels: list[grpc.Channel] = []

    def _open(target: str, *, options=(), credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1), *options]
        if credentials is None:
            ch = grpc.insecure_channel(target, options=opts)
        else:
            ch = grpc.secure_channel(target, credentials, options=opts)
        channels.append(ch)
        return ch

    yield _open
    for ch in channels:
        ch.close()
