"""The run state, ``<MESH_DEMO_DIR>/state.json``: every process the demo started and where it
listens, so ``down``, ``check``, the chaos script and tests find them.

    {"version": 1, "complete": true, "started_at_unix": 1700000000.0,
     "dir": ".../.mesh", "data_dir": ".../.mesh/data", "logs_dir": ".../.mesh/logs",
     "ca_dir": ".../certs",
     "control_plane": {"api": "127.0.0.1:15010", "bootstrap": "127.0.0.1:15011",
                       "admin_http": "127.0.0.1:15014", "otlp": "127.0.0.1:15012",
                       "data_dir": ".../.mesh/control-plane", "ca_dir": ".../certs"},
     "settings": {"rps": 20.0, "lease_s": 5.0, ...},
     "processes": [{"role": "control-plane" | "app" | "sidecar" | "loadgen" | "gateway",
                    "service": "payment", "instance": "payment-1", "pid": 4242,
                    "address": "127.0.0.1:P",     # app: its gRPC address (h2c, loopback);
                                                  # gateway: its HTTP listener
                    "control": "127.0.0.1:C",     # app, loadgen: the HTTP control endpoint
                    "inbound": "", "outbound": "", "admin": "",   # sidecar: its ports
                    "db": ".../payment.sqlite",   # app: the service's database
                    "log": ".../logs/payment-1.log",
                    "cmdline": [...], "start_ticks": 123456}]}

``complete`` is false while ``up`` is still starting processes (the file is rewritten after
each start, so a failed or interrupted ``up`` can still be taken down). ``cmdline`` and
``start_ticks`` (from /proc/PID/stat) tell whether a pid is still the process we started.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1
ROLES = ("control-plane", "app", "sidecar", "loadgen", "gateway")


class StateError(Exception):
    """state.json is missing or unreadable (one line)."""


@dataclass
class ProcessRecord:
    role: str
    service: str
    instance: str
    pid: int
    log: str
    cmdline: list[str]
    start_ticks: int
    address: str = ""
    control: str = ""
    inbound: str = ""
    outbound: str = ""
    admin: str = ""
    db: str = ""

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ProcessRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass
class DemoState:
    dir: str
    data_dir: str
    logs_dir: str
    ca_dir: str
    control_plane: dict[str, str]
    settings: dict[str, Any]
    started_at_unix: float
    complete: bool = False
    processes: list[ProcessRecord] = field(default_factory=list)
    version: int = STATE_VERSION

    def find(self, role: str, service: str | None = None,
             instance: str | None = None) -> list[ProcessRecord]:
        """The records of ``role`` (and ``service``, ``instance`` when given), in start order."""
        return [p for p in self.processes if p.role == role
                and (service is None or p.service == service)
                and (instance is None or p.instance == instance)]

    def one(self, role: str, service: str | None = None,
            instance: str | None = None) -> ProcessRecord:
        """The single matching record; raises StateError when there is none or several."""
        found = self.find(role, service, instance)
        if len(found) != 1:
            raise StateError(f"state.json: expected one {role} {service or ''} "
                             f"{instance or ''}, found {len(found)}")
        return found[0]

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["processes"] = [asdict(p) for p in self.processes]
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> DemoState:
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise StateError(f"state.json: unknown version {doc.get('version')!r}"
                             if isinstance(doc, dict) else "state.json: not a JSON object")
        procs = [ProcessRecord.from_doc(p) for p in doc.get("processes", [])]
        known = set(cls.__dataclass_fields__) - {"processes"}
        return cls(**{k: v for k, v in doc.items() if k in known}, processes=procs)


def save(state: DemoState, path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".json", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_doc(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> DemoState:
    """The state in ``path``; raises StateError when it is missing or not a state file."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"no demo running ({path} not found)") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path}: {exc}") from None
    try:
        return DemoState.from_doc(doc)
    except TypeError as exc:
        raise StateError(f"{path}: {exc}") from None
