"""Start the backend and each path to it, as processes of one `ProcGroup`.

Paths (all entered over plaintext h2c on 127.0.0.1, all ending at the same backend):

* direct: load generator -> backend;
* mesh: -> sidecar "client" outbound -> mTLS -> sidecar "echo" inbound -> backend
  (standalone sidecars, ``python -m sidecar.main --config FILE --log-level warning``);
* mesh-all: the same two hops with a control plane, dynamic sidecars and every default layer
  on (``bench.mesh_full``);
* nginx: -> nginx A (h2c in) -> TLS with client certificate -> nginx B -> backend;
* haproxy: the same two hops with haproxy, when it is installed;
* pipe (`bench.floor` only): the same two hops as byte pipes (`bench.pipe`), no HTTP/2 parsing.

A path names the processes whose CPU and memory are measured (`proxies`: role -> PID): the
sidecars, the nginx workers (not the masters), the haproxy processes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.certs import BenchPki
from bench.peer_configs import haproxy_hop_a, haproxy_hop_b, nginx_hop_a, nginx_hop_b
from bench.procs import BenchError, Proc, ProcGroup, free_port
from bench.procstat import children
from tests.support.sidecar import REPO_ROOT, sidecar_config

MESH_AUTHORITY = "echo"  # the mesh's outbound routes by :authority to the cluster of that name


@dataclass
class BenchPath:
    """One way from the load generator to the backend.

    `port` is the h2c entry port on 127.0.0.1; `authority` the :authority to send (None: the
    default host:port); `proxies` maps a role (e.g. "sidecar-client") to the PID to measure;
    `settle`, when set, returns once work the path's proxies do after their calls (the
    mesh-all sidecars export spans up to a second later, from another thread) is done: CPU
    is read after it, so a run's CPU holds all the work its calls caused and none of an
    earlier run's.
    """

    name: str
    port: int
    authority: str | None = None
    proxies: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    settle: Callable[[], None] | None = None

    def settled(self) -> None:
        """Run `settle` when the path has one."""
        if self.settle is not None:
            self.settle()

    @property
    def target(self) -> str:
        """host:port for a grpcio channel."""
        return f"127.0.0.1:{self.port}"

    def url(self, method_path: str) -> str:
        """http:// URL of a gRPC method on the entry port, e.g. url('/meshtest.Echo/Unary')."""
        return f"http://127.0.0.1:{self.port}{method_path}"

    def check_alive(self) -> None:
        """BenchError naming the first of this path's processes that exited."""
        for p in self.procs:
            if not p.alive():
                raise BenchError(p.describe_failure(f"{self.name} path: process exited during the run"))

    def explain(self, error: BenchError) -> BenchError:
        """`error` with what the path's processes say: the exit of a dead one, or else the
        stderr tails of those that logged anything (the sidecars log warnings and errors)."""
        try:
            self.check_alive()
        except BenchError as dead:
            return BenchError(f"{error}\n{dead}")
        logs = [f"--- {p.name} (pid {p.pid}) stderr tail, {p.log_path} ---\n{tail}"
                for p in self.procs if (tail := p.log_tail(15))]
        return BenchError("\n".join([str(error), *logs]))


def _repo_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def start_backend(group: ProcGroup) -> Proc:
    """The grpc.aio echo backend (bench.backend); its port is `proc.ready["port"]`."""
    return group.start_ready_line(
        "backend", [sys.executable, "-m", "bench.backend", "--port", "0"], env=_repo_env(), cwd=REPO_ROOT
    )


def direct_path(backend: Proc) -> BenchPath:
    """No proxy: the load generator calls the backend itself."""
    return BenchPath(name="direct", port=int(backend.ready["port"]), procs=[backend])


def _start_sidecar(group: ProcGroup, workdir: Path, name: str, cfg: dict,
                   module: str = "sidecar.main") -> Proc:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", module, "--config", str(path), "--log-level", "warning"]
    return group.start_ready_line(name, cmd, env=_repo_env(), cwd=REPO_ROOT)


def start_mesh(group: ProcGroup, workdir: Path, pki: BenchPki, backend: Proc, *,
               bare: bool = False) -> BenchPath:
    """Two standalone sidecars: "echo" (inbound -> backend) and "client" (outbound -> echo).
    ``bare``: without layers (``bench.bare_sidecar``), as the path "mesh-bare"."""
    workdir.mkdir(parents=True, exist_ok=True)
    module = "bench.bare_sidecar" if bare else "sidecar.main"
    echo = _start_sidecar(
        group, workdir, "sidecar-echo",
        sidecar_config(service="echo", tls=pki.echo, app_port=int(backend.ready["port"])),
        module,
    )
    client = _start_sidecar(
        group, workdir, "sidecar-client",
        sidecar_config(service="client", tls=pki.client,
                       clusters={MESH_AUTHORITY: [(echo.ready["inbound"], None)]}),
        module,
    )
    port = int(client.ready["outbound"].rpartition(":")[2])
    return BenchPath(
        name="mesh-bare" if bare else "mesh", port=port, authority=MESH_AUTHORITY,
        proxies={"sidecar-client": client.pid, "sidecar-echo": echo.pid},
        procs=[backend, echo, client],
    )


def _nginx_worker(master: Proc, timeout_s: float = 10) -> int:
    """The PID of the one worker of an nginx master (worker_processes 1)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = children(master.pid)
        if len(kids) == 1:
            return kids[0]
        time.sleep(0.05)
    raise BenchError(master.describe_failure(f"expected one worker process, found {children(master.pid)}"))


def _start_nginx(group: ProcGroup, name: str, prefix: Path, conf_text: str, port: int) -> Proc:
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
    return group.start_listening(name, cmd, [port])


def start_nginx(group: ProcGroup, workdir: Path, pki: BenchPki, backend: Proc) -> BenchPath:
    """nginx A (h2c) -> grpcs -> nginx B (ssl_verify_client on) -> grpc:// backend."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise BenchError("nginx not found: `make install` installs nginx-light")
    port_a, port_b = free_port(), free_port()
    backend_port = int(backend.ready["port"])
    b = _start_nginx(group, "nginx-b", workdir / "nginx-b",
                     nginx_hop_b(workdir / "nginx-b", port_b, backend_port, pki), port_b)
    a = _start_nginx(group, "nginx-a", workdir / "nginx-a",
                     nginx_hop_a(workdir / "nginx-a", port_a, port_b, pki), port_a)
    return BenchPath(
        name="nginx", port=port_a,
        proxies={"nginx-a-worker": _nginx_worker(a), "nginx-b-worker": _nginx_worker(b)},
        procs=[backend, b, a],
    )


def haproxy_available() -> bool:
    """True if the haproxy binary is installed."""
    return shutil.which("haproxy") is not None


def _start_haproxy(group: ProcGroup, name: str, workdir: Path, conf_text: str, port: int) -> Proc:
    conf = workdir / f"{name}.cfg"
    conf.write_text(conf_text)
    haproxy = shutil.which("haproxy") or "haproxy"
    return group.start_listening(name, [haproxy, "-db", "-f", str(conf)], [port])


def start_haproxy(group: ProcGroup, workdir: Path, pki: BenchPki, backend: Proc) -> BenchPath:
    """haproxy A (h2c) -> h2 over mTLS -> haproxy B -> h2c backend; one thread each."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_a, port_b = free_port(), free_port()
    backend_port = int(backend.ready["port"])
    b = _start_haproxy(group, "haproxy-b", workdir, haproxy_hop_b(port_b, backend_port, pki), port_b)
    a = _start_haproxy(group, "haproxy-a", workdir, haproxy_hop_a(port_a, port_b, pki), port_a)
    return BenchPath(
        name="haproxy", port=port_a,
        proxies={"haproxy-a": a.pid, "haproxy-b": b.pid},
        procs=[backend, b, a],
    )


def start_pipe(group: ProcGroup, pki: BenchPki, backend: Proc, *,
               frames: bool = False) -> BenchPath:
    """Two byte pipes (``bench.pipe``) in the mesh's shape: h2c in -> TLS with a client
    certificate -> TLS in -> h2c to the backend. Not a proxy anyone would run: the floor of
    the sidecar's I/O stack, for ``bench.floor``. ``frames``: pipes that walk the HTTP/2
    frames (``bench.pipe --frames``), as the path "pipe-h2"."""
    name = "pipe-h2" if frames else "pipe"
    pipe = [sys.executable, "-m", "bench.pipe", "--listen", "0", *(["--frames"] if frames else [])]
    b = group.start_ready_line(f"{name}-b", [*pipe, "--upstream", f"127.0.0.1:{backend.ready['port']}",
                                          "--tls-in", str(pki.echo.cert), str(pki.echo.key), str(pki.ca)],
                               env=_repo_env(), cwd=REPO_ROOT)
    a = group.start_ready_line(f"{name}-a", [*pipe, "--upstream", f"127.0.0.1:{b.ready['port']}",
                                          "--tls-out", str(pki.client.cert), str(pki.client.key),
                                          str(pki.ca)],
                               env=_repo_env(), cwd=REPO_ROOT)
    return BenchPath(name=name, port=int(a.ready["port"]),
                     proxies={f"{name}-a": a.pid, f"{name}-b": b.pid}, procs=[backend, b, a])
