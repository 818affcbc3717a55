"""Start real processes for tests and wait for them to say they are ready.

Protocol: a process under test prints one JSON line `{"ready": {...}}` on stdout as soon as it
serves. `start` waits for that line (never a fixed sleep), keeps draining stdout afterwards so
the child can never block on a full pipe, and sends stderr to a log file whose tail is put
into every error message. Logs go to ``log_dir`` when given, else to one directory per test
session that is removed when the session ends (``MESH_KEEP_TEST_LOGS=1`` keeps it).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from demo_services.launcher.procs import free_ports

_LIVE: dict[int, Proc] = {}
_LIVE_LOCK = threading.Lock()
_SESSION_LOGS: Path | None = None


def _session_log_dir() -> Path:
    """The directory for the logs of processes started without a ``log_dir`` (made once)."""
    global _SESSION_LOGS
    with _LIVE_LOCK:
        if _SESSION_LOGS is None:
            _SESSION_LOGS = Path(tempfile.mkdtemp(prefix="mesh-test-logs-"))
            if os.environ.get("MESH_KEEP_TEST_LOGS") != "1":
                atexit.register(shutil.rmtree, _SESSION_LOGS, True)
        return _SESSION_LOGS


class ProcError(RuntimeError):
    """A process exited or timed out before it printed its ready line."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, outside the ephemeral range, so no outgoing
    connection takes it before its listener binds it (prefer `--port 0` + the ready line
    when possible)."""
    return free_ports(1, host)[0]


def wait_for(
    predicate: Callable[[], Any],
    timeout_s: float,
    interval_s: float = 0.05,
    what: str = "",
) -> Any:
    """Poll `predicate` until it returns a truthy value, and return that value.

    Exceptions from the predicate count as "not yet". Raises AssertionError naming `what`
    (and the last exception, if any) when `timeout_s` passes.
    """
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as e:  # "not yet"
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}{detail}")
        time.sleep(interval_s)


def hostport(s: str) -> tuple[str, int]:
    """'127.0.0.1:8080' -> ('127.0.0.1', 8080); '[::1]:8080' -> ('::1', 8080)."""
    host, _, port = s.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port:
        raise ValueError(f"not a host:port: {s!r}")
    return host, int(port)


class Proc:
    """A started process. `ready` is the value of the "ready" key of its first stdout line."""

    def __init__(self, cmd: Sequence[str], popen: subprocess.Popen[bytes], log_path: Path):
        self.cmd = list(cmd)
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.ready: Any = None
        self.config_path: Path | None = None  # set by helpers that write a config file
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._stdout_after_ready: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True, name=f"stdout-{self.pid}")
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    # -- introspection -------------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n_lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n_lines:])

    def stdout_lines(self) -> list[str]:
        """Lines printed on stdout after the ready line (drained so far)."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                break
            self._stdout_after_ready.append(line.decode(errors="replace").rstrip("\n"))
        return list(self._stdout_after_ready)

    # -- lifecycle -----------------------------------------------------------------------
    def _wait_ready(self, ready_timeout_s: float) -> None:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise ProcError(
                    f"{self.cmd!r} not ready after {ready_timeout_s}s\n--- stderr tail ---\n{self.log_tail()}"
                )
            try:
                line = self._lines.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if line is None:
                rc = self.popen.wait(timeout=5)
                raise ProcError(
                    f"{self.cmd!r} exited with {rc} before it was ready\n"
                    f"--- stderr tail ---\n{self.log_tail()}"
                )
            text = line.decode(errors="replace").strip()
            try:
                msg = json.loads(text)
            except json.JSONDecodeError as e:
                self.kill()
                raise ProcError(
                    f"{self.cmd!r}: first stdout line is not JSON: {text!r} ({e})\n"
                    f"--- stderr tail ---\n{self.log_tail()}"
                )
            if not isinstance(msg, dict) or "ready" not in msg:
                self.kill()
                raise ProcError(f"{self.cmd!r}: first stdout line has no 'ready' key: {text!r}")
            self.ready = msg["ready"]
            return

    def stop(self, timeout_s: float = 10) -> int:
        """SIGTERM, then SIGKILL if still running after `timeout_s`. Returns the exit code."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        rc = self.popen.wait()
        self._forget()
        return rc

    def kill(self) -> None:
        """SIGKILL the process (no grace) and reap it."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()
        self._forget()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(self.pid, None)
        if self.popen.stdout is not None and not self._reader.is_alive():
            self.popen.stdout.close()

    def __repr__(self) -> str:
        return f"<Proc pid={self.pid} rc={self.returncode} ready={self.ready!r} cmd={self.cmd!r}>"


def start(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 20,
    cwd: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> Proc:
    """Launch `cmd` and wait for its ready line; returns the Proc.

    `env` is merged over os.environ (PYTHONUNBUFFERED=1 is always set). Raises ProcError with
    the stderr tail if the process exits, prints a non-ready line, or is not ready in time.
    """
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    fd, log_name = tempfile.mkstemp(
        prefix=f"{Path(cmd[0]).name}-", suffix=".log", dir=str(log_dir or _session_log_dir())
    )
    with os.fdopen(fd, "wb") as log:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=full_env,
            cwd=cwd,
        )
    proc = Proc(cmd, popen, Path(log_name))
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    proc._wait_ready(ready_timeout_s)
    return proc


def live_procs() -> list[Proc]:
    """Every Proc started by `start` and not yet stopped/killed."""
    with _LIVE_LOCK:
        return list(_LIVE.values())


def stop_all(timeout_s: float = 10) -> None:
    """Stop every process still running that `start` launched."""
    for p in live_procs():
        p.stop(timeout_s=timeout_s)
