"""Where the demo runs and how, from the environment (so tests run it on free ports in a tmp
dir). Every value has a default that makes ``meshctl`` work with no flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mesh_common.numbers import finite_float

SERVICES = ("inventory", "payment", "order")   # started in this order, apps then sidecars
REPLICAS = 2
LOADGEN = "loadgen"
GATEWAY = "gateway"    # the API gateway (HTTP/JSON at the edge) and its outbound-only sidecar


class SettingsError(ValueError):
    """An environment variable with a value that cannot be used (one line)."""


@dataclass(frozen=True)
class Settings:
    """The demo's knobs. Paths are absolute (resolved against the working directory)."""

    dir: Path                   # MESH_DEMO_DIR: run state, logs, data, tokens
    ca_dir: Path                # MESH_CERTS_DIR: the control plane's CA dir (meshctl's too)
    api: str                    # MESH_CONTROL_PLANE: the control plane's API listen address
    bootstrap: str              # MESH_DEMO_BOOTSTRAP: its join listen address
    admin_http: str             # MESH_DEMO_ADMIN_HTTP: its admin HTTP (metrics, dashboard)
    otlp: str                   # MESH_DEMO_OTLP: its embedded OTLP receiver (mTLS)
    trace_sample_rate: float    # MESH_DEMO_TRACE_SAMPLE_RATE: sidecars' --trace-sample-rate
    rps: float                  # MESH_DEMO_RPS: the load generator's rate
    lease_s: float              # MESH_DEMO_LEASE_S: order's saga lease
    report_interval_s: float    # MESH_DEMO_REPORT_INTERVAL_S: sidecars' live state reports
    health_interval_s: float    # MESH_DEMO_HEALTH_INTERVAL_S: sidecars' app health checks
    grace_period_s: float       # MESH_DEMO_GRACE_PERIOD_S: control plane's registry grace
    report_window_s: float      # MESH_DEMO_REPORT_WINDOW_S: what the topology's figures cover
    ready_timeout_s: float      # MESH_DEMO_READY_TIMEOUT_S: all ready and synced within
    stop_timeout_s: float       # MESH_DEMO_STOP_TIMEOUT_S: SIGTERM, then SIGKILL after this
    drain_timeout_s: float      # MESH_DEMO_DRAIN_TIMEOUT_S: sidecars' --drain-timeout-s
    ewma_decay_s: float         # MESH_DEMO_EWMA_DECAY_S: sidecars' --ewma-decay-s (> 0)
    gateway: str = "127.0.0.1:8080"   # MESH_DEMO_GATEWAY: the API gateway's HTTP listener
    via_gateway: bool = False   # MESH_DEMO_VIA_GATEWAY=1: the load generator goes through it

    @property
    def gateway_key_dir(self) -> Path:
        """The demo's token signing key (created by ``up``; the gateway's config names its
        public half as ``${MESH_DEMO_DIR}/gateway/...``)."""
        return self.dir / "gateway"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def data_dir(self) -> Path:
        """The services' SQLite files (one per service)."""
        return self.dir / "data"

    @property
    def tokens_dir(self) -> Path:
        return self.dir / "tokens"

    @property
    def control_plane_data_dir(self) -> Path:
        return self.dir / "control-plane"

    @property
    def lock_path(self) -> Path:
        return self.dir / "demo.lock"

    def db_path(self, service: str) -> Path:
        return self.data_dir / f"{service}.sqlite"


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    """A finite number at least ``minimum`` (``default`` when unset or blank); raises
    SettingsError naming ``name`` (nan and inf too)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = finite_float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    if value < minimum:
        raise SettingsError(f"{name}: at least {minimum:g}, got {raw!r}")
    return value


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    """A finite number above 0."""
    value = _number(env, name, default, 0.0)
    if not value > 0:
        raise SettingsError(f"{name}: a finite number above 0, got {env.get(name)!r}")
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, 0.0)
    if value > 1:
        raise SettingsError(f"{name}: at most 1, got {env.get(name)!r}")
    return value


def _hostport(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{name}: expected HOST:PORT, got {value!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}: expected 1 or 0, got {env.get(name)!r}")


def from_env(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Settings:
    """The settings for ``env`` (default ``os.environ``); raises SettingsError naming the
    variable and the reason."""
    env = os.environ if env is None else env
    base = cwd or Path.cwd()

    def path(name: str, default: str) -> Path:
        return (base / (env.get(name, "").strip() or default)).resolve()

    return Settings(
        dir=path("MESH_DEMO_DIR", ".mesh"),
        ca_dir=path("MESH_CERTS_DIR", "certs"),
        api=_hostport(env, "MESH_CONTROL_PLANE", "127.0.0.1:15010"),
        bootstrap=_hostport(env, "MESH_DEMO_BOOTSTRAP", "127.0.0.1:15011"),
        admin_http=_hostport(env, "MESH_DEMO_ADMIN_HTTP", "127.0.0.1:15014"),
        otlp=_hostport(env, "MESH_DEMO_OTLP", "127.0.0.1:15012"),
        trace_sample_rate=_fraction(env, "MESH_DEMO_TRACE_SAMPLE_RATE", 1.0),
        rps=_number(env, "MESH_DEMO_RPS", 20.0, 0.0),
        lease_s=_number(env, "MESH_DEMO_LEASE_S", 5.0, 0.1),
        report_interval_s=_number(env, "MESH_DEMO_REPORT_INTERVAL_S", 2.0, 0.05),
        health_interval_s=_number(env, "MESH_DEMO_HEALTH_INTERVAL_S", 1.0, 0.1),
        grace_period_s=_number(env, "MESH_DEMO_GRACE_PERIOD_S", 10.0, 0.0),
        report_window_s=_number(env, "MESH_DEMO_REPORT_WINDOW_S", 60.0, 1.0),
        ready_timeout_s=_number(env, "MESH_DEMO_READY_TIMEOUT_S", 60.0, 1.0),
        stop_timeout_s=_number(env, "MESH_DEMO_STOP_TIMEOUT_S", 10.0, 0.1),
        drain_timeout_s=_number(env, "MESH_DEMO_DRAIN_TIMEOUT_S", 5.0, 0.0),
        ewma_decay_s=_positive(env, "MESH_DEMO_EWMA_DECAY_S", 10.0),
        gateway=_hostport(env, "MESH_DEMO_GATEWAY", "127.0.0.1:8080"),
        via_gateway=_flag(env, "MESH_DEMO_VIA_GATEWAY"),
    )
