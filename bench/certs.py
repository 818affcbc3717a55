"""The run's PKI: one CA and the workload certificates every 2-hop path uses.

Certificates come from tests.support.pki (ECDSA P-256, SANs: SPIFFE URI, DNS
<service>.mesh.local and localhost, IP 127.0.0.1). The mesh, nginx and haproxy hops use the
same identities, so their TLS costs are comparable: "client" is the first hop's identity, "echo"
the second hop's (the one next to the backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support.pki import WorkloadCert, make_ca

SERVER_NAME = "echo.mesh.local"  # what the first hop verifies on the second hop's certificate


@dataclass(frozen=True)
class BenchPki:
    """PEM paths: `ca` bundle, `client`/`echo` workloads, and cert+key bundles for haproxy."""

    ca: Path
    client: WorkloadCert
    echo: WorkloadCert
    client_bundle: Path
    echo_bundle: Path


def _bundle(wc: WorkloadCert, path: Path) -> Path:
    """haproxy wants the certificate and its key in one PEM file."""
    path.write_bytes(wc.cert.read_bytes() + wc.key.read_bytes())
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> BenchPki:
    """Create the CA and both workload certificates (valid one day) under `directory`."""
    ca = make_ca(directory, name="bench-ca", days=1)
    client = ca.issue_workload("client")
    echo = ca.issue_workload("echo")
    return BenchPki(
        ca=ca.ca_path,
        client=client,
        echo=echo,
        client_bundle=_bundle(client, directory / "client-bundle.pem"),
        echo_bundle=_bundle(echo, directory / "echo-bundle.pem"),
    )
