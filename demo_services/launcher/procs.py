"""Detached processes for the demo: started in their own session (so they outlive ``up`` and
a Ctrl-C in the terminal reaches only the launcher), stdout and stderr to one log file, their
ready line read back from that file; stopped only by pid and only while that pid is still the
process we started (same /proc cmdline and start time).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state import ProcessRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.05


class LaunchError(Exception):
    """A process exited, or was not ready in time (one line plus its log tail)."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ with unbuffered output and the repository on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


@dataclass
class Spawned:
    """A process we started: its name (for messages), Popen and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cmd: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, n_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])


def spawn(name: str, cmd: Sequence[str], log_path: Path,
          env: Mapping[str, str] | None = None) -> Spawned:
    """Start ``cmd`` in a new session, stdin from /dev/null, stdout+stderr to ``log_path``
    (truncated). Raises OSError if it cannot be executed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=child_env(env), start_new_session=True, close_fds=True)
    return Spawned(name, popen, log_path, list(cmd))


def ready_line(log_path: Path) -> dict[str, Any] | None:
    """The value of the first ``{"ready": {...}}`` line in ``log_path``, or None yet."""
    try:
        with open(log_path, "rb") as f:
            for raw in f:
                if not raw.startswith(b'{"ready"') or not raw.endswith(b"\n"):
                    continue
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(doc, dict) and isinstance(doc.get("ready"), dict):
                    return doc["ready"]
    except FileNotFoundError:
        return None
    return None


def wait_ready(spawned: Iterable[Spawned], deadline: float) -> dict[str, dict[str, Any]]:
    """name -> ready value for every process, once all printed their ready lines.

    Raises LaunchError naming the first process that exits first, or those not ready by
    ``deadline`` (time.monotonic()), with the log's tail."""
    pending = {s.name: s for s in spawned}
    found: dict[str, dict[str, Any]] = {}
    while pending:
        for name, s in list(pending.items()):
            ready = ready_line(s.log_path)
            if ready is not None:
                found[name] = ready
                del pending[name]
            elif s.popen.poll() is not None:
                raise LaunchError(f"{name} exited with {s.popen.returncode} before it was "
                                  f"ready (log {s.log_path}):\n{s.log_tail()}")
        if not pending:
            break
        if time.monotonic() >= deadline:
            first = next(iter(pending.values()))
            raise LaunchError(f"not ready in time: {', '.join(sorted(pending))} "
                              f"(log {first.log_path}):\n{first.log_tail()}")
        time.sleep(POLL_S)
    return found


LISTEN_PORTS = (20000, 32000)
"""Where ``free_ports`` picks (inclusive): below Linux's ephemeral range (32768-60999 by
default), so an outgoing connection's source port can never take a port between the moment
it is picked and the moment its listener binds it (the kernel picks those above)."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (held together while picked),
    outside the ephemeral range (see ``LISTEN_PORTS``). Raises OSError if none is found."""
    import random

    low, high = LISTEN_PORTS
    eph_low, eph_high = _ephemeral_range()
    candidates = [p for p in range(low, high + 1) if not eph_low <= p <= eph_high]
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        for port in rng.sample(candidates, min(len(candidates), 64 * n + 64)):
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(f"no {n} free TCP ports in {low}-{high} on {host}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- identity and stopping

def start_ticks(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()   # fields from the 3rd ("state") on
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def identity(pid: int) -> tuple[list[str], int] | None:
    """(cmdline, start time in clock ticks since boot) of a live process; None if there is
    no such process or it is a zombie (it has exited)."""
    ticks = start_ticks(pid)
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if ticks is None:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]], ticks


def is_ours(record: ProcessRecord) -> bool:
    """True while ``record.pid`` is alive and still the process that was recorded."""
    found = identity(record.pid)
    return found is not None and found == (record.cmdline, record.start_ticks)


def stop(records: Sequence[ProcessRecord], timeout_s: float,
         children: Mapping[int, subprocess.Popen[bytes]] | None = None) -> list[str]:
    """SIGTERM every record that is still ours, wait up to ``timeout_s`` for them to exit,
    SIGKILL those left and wait for them too. Returns one line per process that had to be
    killed or could not be stopped. ``children``: Popen objects of processes this process
    started, reaped as they exit. Never signals a pid that is no longer ours."""
    children = children or {}
    notes: list[str] = []

    def alive() -> list[ProcessRecord]:
        for r in records:
            if r.pid in children:
                children[r.pid].poll()   # reap our own children, so they leave /proc
        return [r for r in records if is_ours(r)]

    def send(rs: Iterable[ProcessRecord], sig: int) -> None:
        for r in rs:
            try:
                os.kill(r.pid, sig)
            except ProcessLookupError:
                pass

    left = alive()
    send(left, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = alive()
    if left:
        notes += [f"{r.instance or r.role} ({r.role}, pid {r.pid}) did not stop in "
                  f"{timeout_s:g}s: killed" for r in left]
        send(left, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while left and time.monotonic() < deadline:
            time.sleep(POLL_S)
            left = alive()
        notes += [f"{r.instance or r.role} (pid {r.pid}) still running after SIGKILL"
                  for r in left]
    return notes


def record_for(spawned: Spawned, role: str, service: str, instance: str,
               **addresses: str) -> ProcessRecord:
    """The state record of a started process: its argv as given and its start time from
    /proc (/proc/PID/cmdline can still be empty just after exec, so it is not read here)."""
    ticks = start_ticks(spawned.pid)
    if ticks is None:
        raise LaunchError(f"{spawned.name} exited (log {spawned.log_path}):\n"
                          f"{spawned.log_tail()}")
    return ProcessRecord(role=role, service=service, instance=instance, pid=spawned.pid,
                         log=str(spawned.log_path), cmdline=[str(a) for a in spawned.cmd],
                         start_ticks=ticks, **addresses)
