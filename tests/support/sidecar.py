"""Start a real sidecar process (standalone mode, `--config FILE`) for integration tests.

The sidecar prints one stdout line when it serves:
    {"ready": {"inbound": "127.0.0.1:P", "outbound": "127.0.0.1:P", "admin": "127.0.0.1:P"}}
("inbound" is absent when the config has no inbound section).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.pki import DEFAULT_TRUST_DOMAIN, WorkloadCert
from tests.support.procs import Proc, hostport, start

__all__ = [
    "REPO_ROOT",
    "admin_addr",
    "hostport",
    "inbound_addr",
    "outbound_addr",
    "sidecar_config",
    "start_sidecar",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

Clusters = Mapping[str, Sequence[tuple[str, str | None]]]


def sidecar_config(
    *,
    service: str,
    tls: WorkloadCert,
    app_port: int | None = None,
    clusters: Clusters | None = None,
    limits: Mapping[str, Any] | None = None,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> dict[str, Any]:
    """The standalone config as a dict (see start_sidecar for the shape)."""
    cfg: dict[str, Any] = {
        "service": service,
        "trust_domain": trust_domain,
        "tls": {"cert": str(tls.cert), "key": str(tls.key), "ca": str(tls.ca)},
    }
    if app_port is not None:
        cfg["inbound"] = {"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}"}
    cfg["outbound"] = {"listen": "127.0.0.1:0"}
    cfg["admin"] = {"listen": "127.0.0.1:0"}
    cluster_list = []
    for name, endpoints in (clusters or {}).items():
        eps = []
        for address, spiffe in endpoints:
            ep: dict[str, str] = {"address": address}
            if spiffe is not None:
                ep["spiffe_id"] = spiffe
            eps.append(ep)
        cluster_list.append({"name": name, "endpoints": eps})
    cfg["clusters"] = cluster_list
    if limits is not None:
        cfg["limits"] = dict(limits)
    return cfg


def start_sidecar(
    tmpdir: str | os.PathLike[str],
    *,
    service: str,
    tls: WorkloadCert,
    app_port: int | None = None,
    clusters: Clusters | None = None,
    limits: Mapping[str, Any] | None = None,
    extra_args: Iterable[str] = (),
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 20,
) -> Proc:
    """Write `<tmpdir>/sidecar-<service>-N.yaml` and run `python -m sidecar.main --config it`.

    `clusters` maps a cluster name to [(address "host:port", spiffe_id or None), ...].
    Returns the Proc once the ready line arrived; `proc.ready` holds the listen addresses
    (use inbound_addr/outbound_addr/admin_addr). `proc.config_path` is the YAML file.
    """
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = sidecar_config(
        service=service,
        tls=tls,
        app_port=app_port,
        clusters=clusters,
        limits=limits,
        trust_domain=trust_domain,
    )
    n = 0
    while (path := d / f"sidecar-{service}-{n}.yaml").exists():
        n += 1
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    full_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if env:
        full_env.update(env)
    proc = start(
        [sys.executable, "-m", "sidecar.main", "--config", str(path), *extra_args],
        env=full_env,
        ready_timeout_s=ready_timeout_s,
        cwd=REPO_ROOT,
        log_dir=d,
    )
    proc.config_path = path
    return proc


def inbound_addr(proc: Proc) -> tuple[str, int]:
    """(host, port) of the sidecar's inbound (mTLS) listener; KeyError if it has none."""
    return hostport(proc.ready["inbound"])


def outbound_addr(proc: Proc) -> tuple[str, int]:
    """(host, port) of the sidecar's outbound (plaintext h2c, loopback) listener."""
    return hostport(proc.ready["outbound"])


def admin_addr(proc: Proc) -> tuple[str, int]:
    """(host, port) of the sidecar's admin HTTP listener."""
    return hostport(proc.ready["admin"])
