"""The immutable snapshot a sidecar runs on: upstream clusters and their endpoints.

Standalone config and (later) the control plane both build this one type; the data path
cannot tell them apart. Pure values, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of an upstream service: its inbound (mTLS) address and expected identity."""

    host: str
    port: int
    spiffe_id: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Cluster:
    """An upstream service and the endpoints that serve it."""

    name: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything the outbound side needs to route a call. ``version`` is opaque."""

    version: str
    clusters: tuple[Cluster, ...] = ()
    _by_name: Mapping[str, Cluster] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", MappingProxyType({c.name: c for c in self.clusters}))

    def cluster(self, name: str) -> Cluster | None:
        return self._by_name.get(name)

    def content_hash(self) -> str:
        """A stable hash of the content (not the version), hex, 16 chars."""
        doc = [asdict(c) for c in self.clusters]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
