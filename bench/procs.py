"""Start and stop the processes a benchmark run needs, always by PID.

Two readiness styles: a ready line (``{"ready": {...}}`` as the first stdout line: the backend
and the sidecars) or a TCP port that accepts connections (nginx, haproxy). Every process started
here is tracked in a `ProcGroup`, whose `stop_all` (called from a ``finally``) sends SIGTERM to
each PID, then SIGKILL after a grace period. stderr goes to a log file whose tail is put into
every error message.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the bench process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class BenchError(RuntimeError):
    """A benchmark step failed; the message says what, and for a process, its stderr tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot report theirs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, timeout_s: float = 0.2) -> bool:
    """True if 127.0.0.1:port accepts a TCP connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    """A started process: `name` for messages, `ready` = its ready line's value (or None)."""

    name: str
    cmd: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: Any = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_lines: int = 30) -> str:
        """The last `n_lines` of the process's stderr log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n_lines:])

    def describe_failure(self, what: str) -> str:
        """One message naming the command, what went wrong, the exit code and the stderr tail."""
        rc = self.popen.poll()
        state = f"exit code {rc}" if rc is not None else "still running"
        return (
            f"{self.name}: {what} ({state})\n  command: {' '.join(self.cmd)}\n"
            f"  stderr log: {self.log_path}\n--- stderr tail ---\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM this PID, SIGKILL after `grace_s`; returns the exit code."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=grace_s)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


@dataclass
class ProcGroup:
    """Every process of one run; `stop_all` stops them in reverse start order."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def _spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None,
               cwd: str | os.PathLike[str] | None) -> Proc:
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env=full_env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
            )
        proc = Proc(name=name, cmd=list(cmd), popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def start_ready_line(self, name: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                         cwd: str | os.PathLike[str] | None = None, timeout_s: float = 30) -> Proc:
        """Start `cmd` and wait (at most `timeout_s` seconds) for its JSON ready line."""
        proc = self._spawn(name, cmd, env, cwd)
        lines: list[bytes] = []
        got = threading.Event()

        def read() -> None:
            assert proc.popen.stdout is not None
            first = proc.popen.stdout.readline()
            lines.append(first)
            got.set()
            for _ in proc.popen.stdout:  # keep draining: the child must never block on stdout
                pass

        threading.Thread(target=read, daemon=True, name=f"stdout-{name}").start()
        if not got.wait(timeout_s):
            raise BenchError(proc.describe_failure(f"no ready line after {timeout_s} s"))
        text = lines[0].decode(errors="replace").strip()
        try:
            proc.ready = json.loads(text)["ready"]
        except (json.JSONDecodeError, KeyError, TypeError):
            time.sleep(0.2)  # let the log catch up with the exit
            raise BenchError(proc.describe_failure(f"first stdout line is not a ready line: {text!r}"))
        return proc

    def start_listening(self, name: str, cmd: Sequence[str], ports: Sequence[int], *,
                        cwd: str | os.PathLike[str] | None = None, timeout_s: float = 15) -> Proc:
        """Start `cmd` and wait (at most `timeout_s` seconds) until every port in `ports` accepts."""
        proc = self._spawn(name, cmd, None, cwd)
        deadline = time.monotonic() + timeout_s
        while not all(port_accepts(p) for p in ports):
            if not proc.alive():
                raise BenchError(proc.describe_failure("exited before it listened"))
            if time.monotonic() > deadline:
                raise BenchError(proc.describe_failure(f"ports {list(ports)} not accepting after {timeout_s} s"))
            time.sleep(0.05)
        return proc

    def check_alive(self) -> None:
        """Raise BenchError naming the first process of the group that has exited."""
        for p in self.procs:
            if not p.alive():
                raise BenchError(p.describe_failure("exited during the run"))

    def stop_all(self, grace_s: float = 5.0) -> None:
        """Stop every process by PID (SIGTERM, then SIGKILL), newest first; never raises."""
        for p in reversed(self.procs):
            try:
                p.stop(grace_s)
            except Exception:  # keep stopping the others
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except OSError:
                    pass
