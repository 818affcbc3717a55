"""SPIFFE IDs for mesh workloads: ``spiffe://<trust-domain>/service/<name>``.

Pure parsing and formatting; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SpiffeError(ValueError):
    """Raised for a string that is not a well-formed mesh SPIFFE ID."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity: the service name inside a trust domain."""

    trust_domain: str
    service: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, str) or not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise SpiffeError(f"invalid trust domain {self.trust_domain!r}")
        if not isinstance(self.service, str) or not _SERVICE.fullmatch(self.service):
            raise SpiffeError(f"invalid service name {self.service!r}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/service/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://td/service/name``; raises SpiffeError naming the fault."""
        prefix = "spiffe://"
        if not isinstance(uri, str) or not uri.startswith(prefix):
            raise SpiffeError(f"not a SPIFFE ID (must start with spiffe://): {uri!r}")
        rest = uri[len(prefix):]
        parts = rest.split("/")
        if len(parts) != 3 or parts[1] != "service":
            raise SpiffeError(f"SPIFFE ID must be spiffe://<trust-domain>/service/<name>: {uri!r}")
        return cls(parts[0], parts[2])


def spiffe_ids_from_sans(sans: object) -> list[str]:
    """Return the URI SANs that look like SPIFFE IDs from ``ssl.getpeercert()['subjectAltName']``."""
    out: list[str] = []
    if not isinstance(sans, tuple | list):
        return out
    for entry in sans:
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == "URI":
            value = entry[1]
            if isinstance(value, str) and value.startswith("spiffe://"):
                out.append(value)
    return out
