"""CPU time and memory of a process, from /proc (Linux).

CPU: utime + stime from /proc/PID/stat, in clock ticks (os.sysconf('SC_CLK_TCK') per second).
Memory: VmRSS from /proc/PID/status, reported in MB (MiB, 2**20 bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK: int = os.sysconf("SC_CLK_TCK")  # clock ticks per second


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name: [state, ppid, ..., utime, stime, ...]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid`, in clock ticks."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12])  # stat fields 14 and 15


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, in seconds."""
    return cpu_ticks(pid) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of `pid`, in MB (2**20 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the value is in kB
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status (a kernel thread or a zombie?)")


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (read from every /proc/*/stat)."""
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry))[1]) == pid:
                kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return sorted(kids)
