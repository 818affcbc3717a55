"""The control plane's durable state in SQLite (WAL): join tokens, issued certificates, the
registry's instances, the snapshot version counter, the revoked certificates, the audit log
and the config objects' revisions (``config_revisions``).

``Store`` is the default ``control_plane.state.StateStore`` (the rows and their contract are
there; ``control_plane.kvstore.ConsulStore`` is the other backend), plus the embedded
registry's instances (``save_instances``/``list_instances``).

One file under the data dir; every method is one transaction on its own short-lived
connection, so the class is safe to call from worker threads. Only a digest of each token's
secret is stored, never the secret or the token string.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.state import (
    MAX_AUDIT_FIELD_CHARS,
    MAX_AUDIT_ROWS,
    AuditRow,
    CertRow,
    ConfigChange,
    DuplicateKey,
    Revision,
    RevokedRow,
    StateStore,
    TokenRow,
    UseResult,
    check_authz_default,
)

__all__ = ["DB_FILE", "MAX_AUDIT_FIELD_CHARS", "MAX_AUDIT_ROWS", "AuditRow", "CertRow",
           "InstanceRow", "RevokedRow", "Store", "TokenRow", "UseResult"]

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
CREATE INDEX IF NOT EXISTS certificates_by_instance ON certificates (instance_id, issued_at);
CREATE TABLE IF NOT EXISTS audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    time     REAL NOT NULL,     -- unix seconds
    identity TEXT NOT NULL,     -- the caller's SPIFFE ID
    action   TEXT NOT NULL,     -- apply, delete, token.create, ... (control_plane.audit)
    object   TEXT NOT NULL,
    result   TEXT NOT NULL      -- "ok..." or "error: <one line>"
);
CREATE INDEX IF NOT EXISTS audit_by_action ON audit (action, id);
CREATE TABLE IF NOT EXISTS revoked (
    serial     TEXT PRIMARY KEY, -- of a certificate in the certificates table
    revoked_at REAL NOT NULL,
    identity   TEXT NOT NULL     -- who revoked it
);
CREATE TABLE IF NOT EXISTS config_revisions (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    revision   INTEGER NOT NULL,   -- 1, 2, ... per object
    spec       TEXT NOT NULL,      -- JSON of the canonical spec (mesh_common.config.to_doc)
    applied_at REAL NOT NULL,      -- unix seconds
    deleted    INTEGER NOT NULL,   -- 1: this revision deleted the object (spec: as it was)
    PRIMARY KEY (kind, name, revision)
);
"""
_CONFIG_COLUMNS = "kind, name, revision, spec, applied_at, deleted"

# meta keys: the last version number handed out, and the latest published snapshot's
_VERSION_COUNTER = "snapshot_version_counter"
_PUBLISHED_VERSION = "snapshot_published_version"
_PUBLISHED_HASH = "snapshot_published_hash"
_AUTHZ_DEFAULT = "authz_default"  # the mesh-wide authorization default: allow or deny


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


def _revision(r: tuple[Any, ...]) -> Revision:
    try:
        spec = json.loads(r[3])
    except ValueError:
        spec = {}
    return Revision(r[0], r[1], int(r[2]), spec if isinstance(spec, dict) else {}, float(r[4]),
                    bool(r[5]))


class Store(StateStore):
    """The control plane's state (``StateStore``) and the embedded registry's instances in
    ``<data_dir>/control-plane.sqlite``."""

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
        committed when the block ends, rolled back when it raises (for a module that keeps
        its own tables here)."""
        return self._tx()

    def describe(self) -> str:
        return f"SQLite {self.path}"

    # ------------------------------------------------------------------ tokens
    def add_token(self, token_id: str, service: str, secret_digest: str, expires_at: float,
                  uses_left: int | None, created_at: float) -> TokenRow:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO tokens (id, service, secret_digest, expires_at,"
                           " uses_left, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (token_id, service, secret_digest, expires_at, uses_left,
                            created_at))
        except sqlite3.IntegrityError:
            raise DuplicateKey(f"a join token with id {token_id!r} exists") from None
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

    def get_certificate(self, serial: str) -> CertRow | None:
        """The issued certificate with ``serial`` (lower-case hex, no leading zeros)."""
        with self._tx() as db:
            row = db.execute("SELECT serial, service, instance_id, spiffe_id, not_after,"
                             " issued_at FROM certificates WHERE serial = ?",
                             (serial,)).fetchone()
        return CertRow(*row) if row else None

    def certificates_of_instance(self, instance_id: str, now: float,
                                 service: str | None = None) -> list[CertRow]:
        """The unexpired certificates (``not_after > now``) issued to ``instance_id`` (of
        ``service`` when given), oldest first."""
        sql = ("SELECT serial, service, instance_id, spiffe_id, not_after, issued_at"
               " FROM certificates WHERE instance_id = ? AND not_after > ?")
        args: tuple[object, ...] = (instance_id, now)
        if service is not None:
            sql += " AND service = ?"
            args += (service,)
        with self._tx() as db:
            rows = db.execute(sql + " ORDER BY issued_at, serial", args).fetchall()
        return [CertRow(*r) for r in rows]

    # ------------------------------------------------------------------ revocation
    def revoke(self, serials: list[str], now: float, identity: str) -> list[str]:
        """Revoke the issued certificates ``serials`` (by ``identity`` at ``now``), in one
        transaction; returns those revoked now (a serial already revoked, or never issued,
        is left out)."""
        done: list[str] = []
        with self._tx() as db:
            for serial in serials:
                if db.execute("SELECT 1 FROM certificates WHERE serial = ?",
                              (serial,)).fetchone() is None:
                    continue
                cur = db.execute("INSERT OR IGNORE INTO revoked (serial, revoked_at, identity)"
                                 " VALUES (?, ?, ?)", (serial, now, identity))
                if cur.rowcount > 0:
                    done.append(serial)
        return done

    def list_revoked(self) -> list[RevokedRow]:
        """Every revoked certificate, oldest revocation first."""
        with self._tx() as db:
            rows = db.execute("SELECT r.serial, r.revoked_at, r.identity,"
                              " COALESCE(c.service, ''), COALESCE(c.instance_id, ''),"
                              " COALESCE(c.not_after, 0) FROM revoked r"
                              " LEFT JOIN certificates c ON c.serial = r.serial"
                              " ORDER BY r.revoked_at, r.serial").fetchall()
        return [RevokedRow(*r) for r in rows]

    def barred_instances(self) -> set[tuple[str, str]]:
        """``(service, instance_id)`` of the instances whose latest certificate (by issue
        time) is revoked: they may not join again under that id, and their endpoints leave
        the snapshot. Instances that joined without an id (``-``) are never barred."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT c.service, c.instance_id FROM certificates c"
                " JOIN revoked r ON r.serial = c.serial"
                " WHERE c.instance_id != '-' AND c.issued_at = ("
                "   SELECT MAX(c2.issued_at) FROM certificates c2"
                "   WHERE c2.service = c.service AND c2.instance_id = c.instance_id)"
            ).fetchall()
        return {(r[0], r[1]) for r in rows}

    # ------------------------------------------------------------------ audit log
    def add_audit(self, row: AuditRow) -> None:
        """Append one entry (text fields cut to ``MAX_AUDIT_FIELD_CHARS``); entries beyond
        the newest ``MAX_AUDIT_ROWS`` are deleted in the same transaction."""
        cut = MAX_AUDIT_FIELD_CHARS
        with self._tx() as db:
            cur = db.execute("INSERT INTO audit (time, identity, action, object, result)"
                             " VALUES (?, ?, ?, ?, ?)",
                             (row.time, row.identity[:cut], row.action[:cut],
                              row.object[:cut], row.result[:cut]))
            last = cur.lastrowid or 0
            if last > MAX_AUDIT_ROWS:
                db.execute("DELETE FROM audit WHERE id <= ?", (last - MAX_AUDIT_ROWS,))

    def list_audit(self, limit: int, action: str = "") -> list[AuditRow]:
        """The newest ``limit`` entries (of ``action`` only, when given), newest first."""
        sql = "SELECT time, identity, action, object, result FROM audit"
        args: tuple[object, ...] = ()
        if action:
            sql += " WHERE action = ?"
            args = (action,)
        with self._tx() as db:
            rows = db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [AuditRow(*r) for r in rows]

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

    # ------------------------------------------------------------------ authorization
    def authz_default(self) -> str:
        """The mesh-wide authorization default (meta key ``authz_default``): ``allow`` until
        someone sets it, so a new mesh works before it has policies."""
        with self._tx() as db:
            value = self._meta(db, _AUTHZ_DEFAULT)
        return value if value in ("allow", "deny") else "allow"

    def set_authz_default(self, action: str) -> None:
        """Store the mesh-wide authorization default (``allow`` or ``deny``; ValueError
        otherwise)."""
        check_authz_default(action)
        with self._tx() as db:
            self._set_meta(db, _AUTHZ_DEFAULT, action)

    # ------------------------------------------------------------------ config revisions
    def config_latest(self) -> list[Revision]:
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_CONFIG_COLUMNS} FROM config_revisions AS r WHERE revision = ("
                " SELECT MAX(revision) FROM config_revisions"
                " WHERE kind = r.kind AND name = r.name) ORDER BY kind, name").fetchall()
        return [_revision(r) for r in rows]

    def config_get(self, kind: str, name: str, revision: int) -> Revision | None:
        with self._tx() as db:
            row = db.execute(f"SELECT {_CONFIG_COLUMNS} FROM config_revisions"
                             " WHERE kind = ? AND name = ? AND revision = ?",
                             (kind, name, revision)).fetchone()
        return _revision(row) if row else None

    def config_revisions(self, kind: str, name: str) -> list[int]:
        with self._tx() as db:
            rows = db.execute("SELECT revision FROM config_revisions WHERE kind = ? AND name = ?"
                              " ORDER BY revision", (kind, name)).fetchall()
        return [int(r[0]) for r in rows]

    def config_save(self, changes: Sequence[ConfigChange], applied_at: float) -> list[int]:
        """All changes in one transaction (all or nothing)."""
        out: list[int] = []
        with self._tx() as db:
            for kind, name, spec, deleted in changes:
                (last,) = db.execute("SELECT COALESCE(MAX(revision), 0) FROM config_revisions"
                                     " WHERE kind = ? AND name = ?", (kind, name)).fetchone()
                revision = int(last) + 1
                db.execute(f"INSERT INTO config_revisions ({_CONFIG_COLUMNS})"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           (kind, name, revision, json.dumps(spec, separators=(",", ":")),
                            applied_at, int(deleted)))
                out.append(revision)
        return out
