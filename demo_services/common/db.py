"""SQLite for the demo services: one database file per service, shared by its replicas (WAL).

Every transaction is ``BEGIN IMMEDIATE`` on a short-lived connection, so replicas (processes)
and threads serialize their writes through SQLite's own lock and never see half a change.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with a busy timeout."""
    db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                         check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Switching a fresh file to WAL from several processes at once answers "database is
    # locked" at once (SQLite does not wait out the busy timeout for it): retry until it has.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    attempt = 0
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            attempt += 1
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                db.close()
                raise
            time.sleep(min(0.01 * attempt, 0.2))
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def init(path: str | Path, schema: str) -> None:
    """Create the file (parents too) and run the idempotent DDL ``schema``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = connect(path)
    try:
        db.executescript(schema)
    finally:
        db.close()


@contextmanager
def tx(path: str | Path) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception)."""
    db = connect(path)
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


@contextmanager
def read(path: str | Path) -> Iterator[sqlite3.Connection]:
    """One read transaction (a consistent view across several SELECTs)."""
    db = connect(path)
    try:
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("ROLLBACK")
    finally:
        db.close()
