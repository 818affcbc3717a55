"""Certificate revocation on the control plane: which workload certificates are revoked, the
deny-list every snapshot carries, and which instances are barred.

* A revoked certificate is never renewed (``Identity.Renew`` with it is PERMISSION_DENIED)
  and opens nothing on the control plane's API; its serial goes into every snapshot's
  ``revoked`` list until its certificate has expired (plus ``DENY_LIST_SKEW_S`` for clocks
  that differ), so peers refuse its new connections (an expired certificate is refused by
  the TLS handshake itself).
* An instance whose latest certificate is revoked is *barred*: its endpoint leaves the
  snapshot at once (callers stop picking it) and it may not join again under the same
  instance id. Revoking an older certificate the instance has since renewed bars nothing.

``Revocations`` is the in-memory copy the hot checks read (one dict or set lookup); the
store (``revoked`` table) is the durable one. Serials are lower-case hex without leading
zeros, as ``format(serial, "x")`` writes them.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import grpc
from cryptography import x509

from control_plane.registry import Key
from control_plane.store import RevokedRow, Store

DENY_LIST_SKEW_S = 300.0
"""A revoked serial stays in the deny-list this long after its certificate's expiry."""
MAX_SERIAL_HEX = 40   # X.509 serials are at most 20 octets
_HEX = frozenset(string.hexdigits.lower())


def normalize_serial(text: str) -> str:
    """A certificate serial as the mesh writes it: lower-case hex without leading zeros.
    Accepts upper case, a ``0x`` prefix and ``:`` separators (``1F:2E``). Raises ValueError
    (one line) for anything else. Pure."""
    s = text.strip().lower().replace(":", "")
    if s.startswith("0x"):
        s = s[2:]
    if not s or len(s) > MAX_SERIAL_HEX or not set(s) <= _HEX:
        raise ValueError(f"not a certificate serial (hex, at most {MAX_SERIAL_HEX} digits): "
                         f"{text[:64]!r}")
    return s.lstrip("0") or "0"


def peer_serial(context: grpc.aio.ServicerContext) -> str:
    """The serial (normalized) of the caller's verified client certificate, "" when there is
    none or it does not parse."""
    for pem in context.auth_context().get("x509_pem_cert", []):
        try:
            return format(x509.load_pem_x509_certificate(pem).serial_number, "x")
        except ValueError:
            return ""
    return ""


class Revocations:
    """The revoked serials (with their certificates' expiry, unix seconds; 0 = unknown) and
    the barred instances, in memory. Loaded from the store at start; ``add`` after each
    revocation the store recorded."""

    def __init__(self, revoked: Iterable[RevokedRow] = (),
                 barred: Iterable[Key] = ()) -> None:
        self._not_after: dict[str, float] = {r.serial: r.not_after for r in revoked}
        self._barred: frozenset[Key] = frozenset(barred)

    @classmethod
    def load(cls, store: Store) -> Revocations:
        """The revocations the store holds (blocking I/O)."""
        return cls(store.list_revoked(), store.barred_instances())

    def __len__(self) -> int:
        return len(self._not_after)

    def is_revoked(self, serial: str) -> bool:
        """Whether ``serial`` (normalized) is revoked; "" never is."""
        return bool(serial) and serial in self._not_after

    def is_barred(self, service: str, instance_id: str) -> bool:
        """Whether the instance's latest certificate is revoked (it may not join again)."""
        return (service, instance_id) in self._barred

    def barred(self) -> frozenset[Key]:
        """The barred instances' ``(service, instance_id)`` keys."""
        return self._barred

    def deny_list(self, now: float) -> tuple[str, ...]:
        """The serials a snapshot published at ``now`` carries: the revoked ones whose
        certificate has not expired (``DENY_LIST_SKEW_S`` ago), sorted."""
        return tuple(sorted(s for s, not_after in self._not_after.items()
                            if not not_after or not_after + DENY_LIST_SKEW_S > now))

    def add(self, rows: Iterable[RevokedRow], barred: Iterable[Key]) -> None:
        """Take in newly revoked certificates and the barred set as the store now has it."""
        for r in rows:
            self._not_after[r.serial] = r.not_after
        self._barred = frozenset(barred)
