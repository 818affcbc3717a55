"""What the control plane stores besides the registry's instances, as one interface with two
backends: ``StateStore``.

* ``control_plane.store.Store``: one SQLite file in the data dir (the default; one control
  plane).
* ``control_plane.kvstore.ConsulStore``: Consul's KV under a prefix (``mesh-control-plane
  --registry consul://...``), shared by every control-plane replica; every write is a
  check-and-set, so two replicas never overwrite each other.

Both pass one contract suite (tests/integration/test_state_contract.py). What is stored:

* join tokens: only a digest of each token's secret, never the secret or the token string;
  ``use_token`` spends one use atomically (a one-use token used by two replicas at once is
  spent by exactly one);
* the certificates the CA issued (by lower-case hex serial without leading zeros), the
  revoked ones, and from both the *barred* instances (whose latest certificate is revoked);
* the audit log, newest first, the newest ``MAX_AUDIT_ROWS`` entries kept;
* the snapshot version counter (monotonic, shared by the replicas) and the latest published
  snapshot's version and content hash;
* the mesh-wide authorization default (``allow`` until set);
* every revision of every config object (``control_plane.config_store`` plans and applies
  them): revisions 1, 2, ... per object, never reused; one ``config_save`` is all or nothing.

Every method is blocking I/O, safe to call from any thread (the server calls them through
``asyncio.to_thread``); ``watch`` tells a replica when another one changed what it keeps in
memory. Times are unix seconds. The rest of this module is pure: the rows, the errors and the
decisions both backends share.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mesh_common.authz import DEFAULTS as AUTHZ_DEFAULTS

MAX_AUDIT_ROWS = 100_000
"""The audit log keeps the newest this many entries (older ones are deleted as new ones
come), so callers refused in a loop cannot fill the disk."""
MAX_AUDIT_FIELD_CHARS = 2048
"""Each text field of an audit entry is cut to this many characters."""
DEFAULT_AUTHZ = "allow"
"""The mesh-wide authorization default until someone sets it: a new mesh works before it
has policies."""

WATCH_CONFIG = "config"
WATCH_AUTHZ = "authz"
WATCH_REVOKED = "revoked"
WATCH_TOPICS = (WATCH_CONFIG, WATCH_AUTHZ, WATCH_REVOKED)
"""What ``StateStore.watch`` reports: the config objects, the authorization default, the
revoked certificates (what a control plane keeps in memory and publishes)."""


class StateError(RuntimeError):
    """The store could not do what was asked (unreachable, refused, too large, too much
    contention); ``str(err)`` is one line saying why. Nothing was written unless the method
    says otherwise."""


class DuplicateKey(StateError, ValueError):
    """A create-only write found the key taken (``add_token`` with an id that exists)."""


@dataclass(frozen=True)
class TokenRow:
    token_id: str
    service: str
    secret_digest: str
    expires_at: float
    uses_left: int | None
    created_at: float


@dataclass(frozen=True)
class CertRow:
    serial: str
    service: str
    instance_id: str
    spiffe_id: str
    not_after: float
    issued_at: float


@dataclass(frozen=True)
class AuditRow:
    """One audit log entry: who (SPIFFE ID) did what (``action`` on ``object``), when (unix
    seconds), and how it ended (``result``: ``ok`` or ``error: <one line>``)."""

    time: float
    identity: str
    action: str
    object: str
    result: str


@dataclass(frozen=True)
class RevokedRow:
    """A revoked certificate: its serial, when and by whom, and the certificate's owner and
    expiry as issued."""

    serial: str
    revoked_at: float
    identity: str
    service: str
    instance_id: str
    not_after: float


@dataclass(frozen=True)
class Revision:
    """One stored revision of a config object: its canonical spec (a JSON-able mapping),
    ``applied_at`` in unix seconds and whether it is a deletion."""

    kind: str
    name: str
    revision: int
    spec: dict[str, Any]
    applied_at: float
    deleted: bool

    def doc(self) -> dict[str, Any]:
        """The document ``{kind, name, spec}`` (what ``apply`` takes back)."""
        return {"kind": self.kind, "name": self.name, "spec": self.spec}


class UseResult(Enum):
    """The outcome of trying to consume one use of a token."""

    OK = "ok"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    USED_UP = "used up"


ConfigChange = tuple[str, str, dict[str, Any], bool]
"""``(kind, name, spec, deleted)``: one object's next revision, as ``config_save`` takes it."""

# ---------------------------------------------------------------------- pure decisions


def use_outcome(tok: TokenRow | None, now: float) -> tuple[UseResult, TokenRow | None]:
    """What spending one use of ``tok`` at ``now`` gives: UNKNOWN (no token), EXPIRED
    (``now >= expires_at``), USED_UP (a limited token with no use left), or OK with the row
    as it is after the use (``uses_left`` one lower; unchanged when unlimited). Pure."""
    if tok is None:
        return UseResult.UNKNOWN, None
    if now >= tok.expires_at:
        return UseResult.EXPIRED, tok
    if tok.uses_left is None:
        return UseResult.OK, tok
    if tok.uses_left <= 0:
        return UseResult.USED_UP, tok
    return UseResult.OK, TokenRow(tok.token_id, tok.service, tok.secret_digest, tok.expires_at,
                                  tok.uses_left - 1, tok.created_at)


def cut_audit(row: AuditRow, max_chars: int = MAX_AUDIT_FIELD_CHARS) -> AuditRow:
    """``row`` with each text field cut to ``max_chars`` characters. Pure."""
    return AuditRow(row.time, row.identity[:max_chars], row.action[:max_chars],
                    row.object[:max_chars], row.result[:max_chars])


def barred_of(certs: Iterable[CertRow], revoked: Iterable[str]) -> set[tuple[str, str]]:
    """``(service, instance_id)`` of the instances whose latest certificate (by issue time;
    any of several issued at that same time) is among the ``revoked`` serials. Instances
    that joined without an id (``-``) are never barred. ``certs`` must hold every
    certificate of the instances that matter (more is fine). Pure."""
    gone = set(revoked)
    latest: dict[tuple[str, str], float] = {}
    for c in certs:
        key = (c.service, c.instance_id)
        if key not in latest or c.issued_at > latest[key]:
            latest[key] = c.issued_at
    return {(c.service, c.instance_id) for c in certs
            if c.instance_id != "-" and c.serial in gone
            and c.issued_at == latest[(c.service, c.instance_id)]}


def check_authz_default(action: str) -> str:
    """``action`` when it is an authorization default (``allow``/``deny``); ValueError
    otherwise."""
    if action not in AUTHZ_DEFAULTS:
        raise ValueError(f"the authorization default is allow or deny, not {action!r}")
    return action


def unique(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, in first-seen order. Pure."""
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------- the interface
class StateStore(ABC):
    """The control plane's shared state (see the module docstring). Every method is blocking
    I/O and thread-safe; a write either happens whole or raises (``StateError``, or the
    backend's own error for a broken file) having written nothing."""

    def describe(self) -> str:
        """Where the state lives, for logs (no secrets)."""
        return type(self).__name__

    def watch(self, on_change: Callable[[str], None]) -> Callable[[], None]:
        """Call ``on_change(topic)`` (a ``WATCH_TOPICS`` value) from a background thread
        whenever another writer may have changed that part of the state (a woken watch is no
        proof of a change; the first call of each topic may come at once). Returns a function
        that stops watching (it does not wait for the thread). The default watches nothing:
        a store only this process writes (SQLite) needs no watch."""
        return lambda: None

    # ------------------------------------------------------------------ tokens
    @abstractmethod
    def add_token(self, token_id: str, service: str, secret_digest: str, expires_at: float,
                  uses_left: int | None, created_at: float) -> TokenRow:
        """Store a new token (``uses_left`` None = unlimited until expiry); returns its row.
        Raises ``DuplicateKey`` when ``token_id`` exists."""

    @abstractmethod
    def get_token(self, token_id: str) -> TokenRow | None:
        """The token, or None."""

    @abstractmethod
    def list_tokens(self) -> list[TokenRow]:
        """Every token, by ``(created_at, token_id)``."""

    @abstractmethod
    def delete_token(self, token_id: str) -> bool:
        """Delete the token; False when there was none."""

    @abstractmethod
    def use_token(self, token_id: str, now: float) -> tuple[UseResult, TokenRow | None]:
        """Consume one use of the token atomically (``use_outcome`` decides; the row as it
        is after the use): of concurrent callers, never more succeed than it had uses."""

    @abstractmethod
    def give_back_use(self, token_id: str) -> None:
        """Undo one ``use_token`` (the join failed after the use was taken); nothing for an
        unknown or unlimited token."""

    # ------------------------------------------------------------------ certificates
    @abstractmethod
    def record_certificate(self, serial: str, service: str, instance_id: str, spiffe_id: str,
                           not_after: float, issued_at: float,
                           token_id: str | None = None) -> None:
        """Record an issued certificate (replacing a record of the same serial);
        ``token_id``: the token it was joined with, None for a renewal."""

    @abstractmethod
    def list_certificates(self) -> list[CertRow]:
        """Every issued certificate, by ``(issued_at, serial)``."""

    @abstractmethod
    def get_certificate(self, serial: str) -> CertRow | None:
        """The issued certificate with ``serial`` (lower-case hex, no leading zeros)."""

    @abstractmethod
    def certificates_of_instance(self, instance_id: str, now: float,
                                 service: str | None = None) -> list[CertRow]:
        """The unexpired certificates (``not_after > now``) issued to ``instance_id`` (of
        ``service`` when given), by ``(issued_at, serial)``."""

    # ------------------------------------------------------------------ revocation
    @abstractmethod
    def revoke(self, serials: list[str], now: float, identity: str) -> list[str]:
        """Revoke the issued certificates ``serials`` (by ``identity`` at ``now``); returns
        those revoked now, in the order given (a serial already revoked, by this call or an
        earlier one, or never issued, is left out)."""

    @abstractmethod
    def list_revoked(self) -> list[RevokedRow]:
        """Every revoked certificate, by ``(revoked_at, serial)``; owner fields empty (and
        ``not_after`` 0) when its record is missing."""

    @abstractmethod
    def barred_instances(self) -> set[tuple[str, str]]:
        """``(service, instance_id)`` of the instances whose latest certificate is revoked
        (``barred_of``)."""

    # ------------------------------------------------------------------ audit log
    @abstractmethod
    def add_audit(self, row: AuditRow) -> None:
        """Append one entry (``cut_audit``); only the newest ``MAX_AUDIT_ROWS`` are kept."""

    @abstractmethod
    def list_audit(self, limit: int, action: str = "") -> list[AuditRow]:
        """The newest ``limit`` entries (of ``action`` only, when given), newest first."""

    # ------------------------------------------------------------------ snapshot versions
    @abstractmethod
    def published_snapshot(self) -> tuple[int, str]:
        """``(version, content hash)`` of the latest published snapshot; ``(0, "")`` if none."""

    @abstractmethod
    def publish_snapshot(self, content_hash: str, force: bool = False) -> int:
        """The version of a snapshot with ``content_hash``: the latest published one's when
        the hash is the same (unless ``force``), else the next number of the counter
        (recorded as the latest). Numbers are never handed out twice."""

    @abstractmethod
    def take_version_number(self) -> int:
        """Consume the next version number without publishing anything (test hooks)."""

    # ------------------------------------------------------------------ authorization
    @abstractmethod
    def authz_default(self) -> str:
        """The mesh-wide authorization default: ``allow`` or ``deny`` (``DEFAULT_AUTHZ``
        until set)."""

    @abstractmethod
    def set_authz_default(self, action: str) -> None:
        """Store the mesh-wide authorization default (``check_authz_default``: ValueError
        for anything but allow or deny)."""

    # ------------------------------------------------------------------ config revisions
    @abstractmethod
    def config_latest(self) -> list[Revision]:
        """The latest revision of every object ever stored (deletions included), by kind
        and name."""

    @abstractmethod
    def config_get(self, kind: str, name: str, revision: int) -> Revision | None:
        """Revision ``revision`` of the object, or None."""

    @abstractmethod
    def config_revisions(self, kind: str, name: str) -> list[int]:
        """The revision numbers stored for the object, ascending."""

    @abstractmethod
    def config_save(self, changes: Sequence[ConfigChange], applied_at: float) -> list[int]:
        """Store each ``(kind, name, spec, deleted)`` as the next revision of its object, all
        or nothing; returns their revision numbers, in order. Concurrent saves never hand
        out one revision number twice."""
