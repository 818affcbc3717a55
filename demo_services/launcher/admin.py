"""The control plane's Admin API as the demo uses it (mTLS with meshctl's admin credentials
from the CA dir): join tokens, sidecar status, topology, the snapshot a sidecar holds."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 5.0


class AdminClient:
    """A channel to the control plane's API listener as ``spiffe://<td>/admin/meshctl``."""

    def __init__(self, api: str, ca_dir: Path) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(ca_dir / "ca.pem").read_bytes(),
            private_key=(ca_dir / "admin-key.pem").read_bytes(),
            certificate_chain=(ca_dir / "admin.pem").read_bytes())
        self.channel = grpc.secure_channel(api, creds)
        self.stub = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def create_token(self, service: str, ttl_s: int) -> str:
        """A reusable join token for ``service``, valid ``ttl_s`` seconds (the string)."""
        resp = self.stub.CreateToken(pb.CreateTokenRequest(service=service, ttl_s=ttl_s),
                                     timeout=RPC_TIMEOUT_S)
        return resp.token

    def sidecars(self) -> tuple[list[pb.SidecarStatus], str]:
        """(every registered sidecar, the latest snapshot version)."""
        resp = self.stub.ListSidecars(pb.ListSidecarsRequest(), timeout=RPC_TIMEOUT_S)
        return list(resp.sidecars), resp.latest_version

    def topology(self) -> pb.TopologyResponse:
        return self.stub.Topology(pb.TopologyRequest(), timeout=RPC_TIMEOUT_S)

    def held_snapshot(self, instance: str) -> dict[str, Any]:
        """The snapshot document the sidecar ``instance`` holds (asked over its stream)."""
        resp = self.stub.GetSidecarConfig(pb.GetSidecarConfigRequest(instance=instance),
                                          timeout=RPC_TIMEOUT_S)
        return json.loads(resp.json).get("snapshot") or {}


def endpoints_by_service(snapshot: Mapping[str, Any]) -> dict[str, dict[str, bool]]:
    """service -> {instance: healthy} for the clusters of a snapshot document."""
    return {c["name"]: {e["instance"]: bool(e.get("healthy", True))
                        for e in c.get("endpoints", [])}
            for c in snapshot.get("clusters", [])}


def sync_gaps(sidecars: Iterable[pb.SidecarStatus], expected_sidecars: set[str],
              held: Mapping[str, Mapping[str, Any]],
              expected_endpoints: Mapping[str, set[str]]) -> list[str]:
    """What still keeps the mesh from being ready, one short line each (empty: ready).

    Ready: every instance in ``expected_sidecars`` is registered, connected and SYNCED, and
    the snapshot each holds (``held``: instance -> snapshot document) has, for every service
    of ``expected_endpoints``, exactly those instances, all healthy. Pure."""
    gaps: list[str] = []
    by_instance = {s.instance: s for s in sidecars}
    for inst in sorted(expected_sidecars):
        s = by_instance.get(inst)
        if s is None:
            gaps.append(f"{inst}: not registered")
        elif not s.connected or s.state != "SYNCED":
            gaps.append(f"{inst}: {s.state or 'unknown'}{'' if s.connected else ' (down)'}")
        elif inst not in held:
            gaps.append(f"{inst}: snapshot not read yet")
        else:
            eps = endpoints_by_service(held[inst])
            for service, want in sorted(expected_endpoints.items()):
                have = eps.get(service, {})
                if set(have) != want:
                    gaps.append(f"{inst}: {service} endpoints {sorted(have)}")
                elif not all(have.values()):
                    sick = sorted(i for i, ok in have.items() if not ok)
                    gaps.append(f"{inst}: {service} unhealthy {sick}")
    return gaps
