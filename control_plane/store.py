"""The control plane's durable state in SQLite (WAL): join tokens, issued certificates, the
registry's instances and the snapshot version counter (``config_store`` keeps the config
objects' revisions in the same file, through ``transaction``).

One file under the data dir; every method is one transaction on its own short-lived
connection, so the class is safe to call from worker threads. Only a digest of each token's
secret is stored, never the secret or the token string.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

DB_FILE = "control-plane.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id            TEXT PRIMARY KEY,
    service       TEXT NOT NULL,
    secret_digest TEXT NOT NULL,
    expires_at    REAL NOT NULL,
    uses_left     INTEGER,          -- NULL = unlimited until expiry
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial      TEXT PRIMARY KEY,   -- hex
    service     TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    spiffe_id   TEXT NOT NULL,
    not_after   REAL NOT NULL,
    issued_at   REAL NOT NULL,
    token_id    TEXT               -- the token it was joined with; NULL for a renewal
);
CREATE INDEX IF NOT EXISTS certificates_by_service ON certificates (service, issued_at);
CREATE TABLE IF NOT EXISTS instances (
    service       TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    spiffe_id     TEXT NOT NULL,
    inbound       TEXT NOT NULL,    -- HOST:PORT; '' = outbound-only
    outbound      TEXT NOT NULL,
    admin         TEXT NOT NULL,
    labels        TEXT NOT NULL,    -- JSON object
    health        TEXT NOT NULL,    -- the last the app reported; '' = no app
    registered_at REAL NOT NULL,
    PRIMARY KEY (service, instance_id)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# meta keys: the last version number handed out, and the latest published snapshot's
_VERSION_COUNTER = "snapshot_version_counter"
_PUBLISHED_VERSION = "snapshot_published_version"
_PUBLISHED_HASH = "snapshot_published_hash"


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
class InstanceRow:
    """A registry instance as stored; connection state is not stored (after a restart every
    instance counts as disconnected from the restart)."""

    service: str
    instance_id: str
    spiffe_id: str
    inbound: str
    outbound: str
    admin: str
    labels: tuple[tuple[str, str], ...]
    health: str
    registered_at: float


class UseResult(Enum):
    """The outcome of trying to consume one use of a token."""

    OK = "ok"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    USED_UP = "used up"


class Store:
    """Tokens and issued certificates in ``<data_dir>/control-plane.sqlite``."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)  # idempotent DDL; executescript manages its own commit
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on a short-lived connection to the same file,
        committed when the block ends, rolled back when it raises (for the modules that keep
        their own tables here, like ``config_store``)."""
        return self._tx()

    # ------------------------------------------------------------------ tokens
    def add_token(self, token_id: str, service: str, secret_digest: str, expires_at: float,
                  uses_left: int | None, created_at: float) -> TokenRow:
        with self._tx() as db:
            db.execute("INSERT INTO tokens (id, service, secret_digest, expires_at, uses_left,"
                       " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (token_id, service, secret_digest, expires_at, uses_left, created_at))
        return TokenRow(token_id, service, secret_digest, expires_at, uses_left, created_at)

    def get_token(self, token_id: str) -> TokenRow | None:
        with self._tx() as db:
            row = db.execute("SELECT id, service, secret_digest, expires_at, uses_left, created_at"
                             " FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return TokenRow(*row) if row else None

    def list_tokens(self) -> list[TokenRow]:
        with self._tx() as db:
            rows = db.execute("SELECT id, service, secret_digest, expires_at, uses_left, created_at"
                              " FROM tokens ORDER BY created_at, id").fetchall()
        return [TokenRow(*r) for r in rows]

    def delete_token(self, token_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM tokens WHERE id = ?", (token_id,))
        return cur.rowcount > 0

    def use_token(self, token_id: str, now: float) -> tuple[UseResult, TokenRow | None]:
        """Consume one use of the token, atomically (check and decrement in one transaction)."""
        with self._tx() as db:
            row = db.execute("SELECT id, service, secret_digest, expires_at, uses_left, created_at"
                             " FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                return UseResult.UNKNOWN, None
            tok = TokenRow(*row)
            if now >= tok.expires_at:
                return UseResult.EXPIRED, tok
            if tok.uses_left is not None:
                if tok.uses_left <= 0:
                    return UseResult.USED_UP, tok
                db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?", (token_id,))
                tok = TokenRow(tok.token_id, tok.service, tok.secret_digest, tok.expires_at,
                               tok.uses_left - 1, tok.created_at)
            return UseResult.OK, tok

    def give_back_use(self, token_id: str) -> None:
        """Undo one ``use_token`` (the join failed after the use was taken)."""
        with self._tx() as db:
            db.execute("UPDATE tokens SET uses_left = uses_left + 1"
                       " WHERE id = ? AND uses_left IS NOT NULL", (token_id,))

    # ------------------------------------------------------------------ certificates
    def record_certificate(self, serial: str, service: str, instance_id: str, spiffe_id: str,
                           not_after: float, issued_at: float,
                           token_id: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO certificates (serial, service, instance_id,"
                       " spiffe_id, not_after, issued_at, token_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (serial, service, instance_id, spiffe_id, not_after, issued_at, token_id))

    def list_certificates(self) -> list[CertRow]:
        with self._tx() as db:
            rows = db.execute("SELECT serial, service, instance_id, spiffe_id, not_after,"
                              " issued_at FROM certificates ORDER BY issued_at, serial").fetchall()
        return [CertRow(*r) for r in rows]

    # ------------------------------------------------------------------ registry instances
    def save_instances(self, upserts: list[InstanceRow],
                       deletes: list[tuple[str, str]]) -> None:
        """Write ``upserts`` and delete the ``(service, instance_id)`` keys in ``deletes``, in
        one transaction."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO instances (service, instance_id, spiffe_id,"
                           " inbound, outbound, admin, labels, health, registered_at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(r.service, r.instance_id, r.spiffe_id, r.inbound, r.outbound,
                             r.admin, json.dumps(dict(r.labels), sort_keys=True), r.health,
                             r.registered_at) for r in upserts])
            db.executemany("DELETE FROM instances WHERE service = ? AND instance_id = ?",
                           deletes)

    def list_instances(self) -> list[InstanceRow]:
        """Every stored instance, by ``(service, instance_id)``."""
        with self._tx() as db:
            rows = db.execute("SELECT service, instance_id, spiffe_id, inbound, outbound, admin,"
                              " labels, health, registered_at FROM instances"
                              " ORDER BY service, instance_id").fetchall()
        out: list[InstanceRow] = []
        for r in rows:
            try:
                labels = json.loads(r[6])
            except ValueError:
                labels = {}
            if not isinstance(labels, dict):
                labels = {}
            out.append(InstanceRow(r[0], r[1], r[2], r[3], r[4], r[5],
                                   tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                                   r[7], r[8]))
        return out

    # ------------------------------------------------------------------ snapshot versions
    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> str | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _take(self, db: sqlite3.Connection) -> int:
        n = int(self._meta(db, _VERSION_COUNTER) or 0) + 1
        self._set_meta(db, _VERSION_COUNTER, str(n))
        return n

    def published_snapshot(self) -> tuple[int, str]:
        """``(version, content hash)`` of the latest published snapshot; ``(0, "")`` if none."""
        with self._tx() as db:
            version = self._meta(db, _PUBLISHED_VERSION)
            digest = self._meta(db, _PUBLISHED_HASH)
        return (int(version), digest or "") if version else (0, "")

    def publish_snapshot(self, content_hash: str, force: bool = False) -> int:
        """The version of a snapshot with ``content_hash``: the latest published one's when the
        hash is the same (unless ``force``), else the next number of the counter (recorded as
        the latest)."""
        with self._tx() as db:
            version = self._meta(db, _PUBLISHED_VERSION)
            if version and self._meta(db, _PUBLISHED_HASH) == content_hash and not force:
                return int(version)
            n = self._take(db)
            self._set_meta(db, _PUBLISHED_VERSION, str(n))
            self._set_meta(db, _PUBLISHED_HASH, content_hash)
            return n

    def take_version_number(self) -> int:
        """Consume the next version number without publishing anything (test hooks)."""
        with self._tx() as db:
            return self._take(db)
