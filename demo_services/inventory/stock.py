"""Inventory's business logic over its own SQLite file: stock per SKU and reservations per
order. No gRPC server code here (the servicer in ``service.py`` is thin).

Idempotency: every Reserve and Release is keyed by ``(order_id, step)``; the first answer,
success or refusal, is recorded in the same transaction as its effect, and a repeated call
returns (or re-raises) that answer with ``replayed=True`` and changes nothing twice. A Release
that arrives before its Reserve is recorded too, so the late Reserve is refused ("cancel
before try").

Invariant kept by every transaction, per SKU: available + reserved == opening. Several
``StockBook`` objects (replicas, threads) may share one file: each operation is one
``BEGIN IMMEDIATE`` transaction, so they see one truth.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from demo_services.common import catalog, db
from demo_services.common.errors import BusinessError

RESERVED = "RESERVED"
RELEASED = "RELEASED"
_STEP_RESERVE = "reserve"
_STEP_RELEASE = "release"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stock (
    sku         TEXT PRIMARY KEY,
    opening     INTEGER NOT NULL,
    available   INTEGER NOT NULL CHECK (available >= 0),
    reserved    INTEGER NOT NULL CHECK (reserved >= 0),
    price_cents INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT NOT NULL,
    sku      TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    state    TEXT NOT NULL CHECK (state IN ('RESERVED', 'RELEASED')),
    at_unix  REAL NOT NULL,
    PRIMARY KEY (order_id, sku)
);
-- The first answer to each (order_id, step): ok = 1, or the refusal's status.
CREATE TABLE IF NOT EXISTS answers (
    order_id      TEXT NOT NULL,
    step          TEXT NOT NULL CHECK (step IN ('reserve', 'release')),
    ok            INTEGER NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    at_unix       REAL NOT NULL,
    PRIMARY KEY (order_id, step)
);
"""


@dataclass(frozen=True)
class ReserveResult:
    """A Reserve's answer: ``reserved`` is always True (a refusal is raised instead)."""

    order_id: str
    reserved: bool
    replayed: bool


@dataclass(frozen=True)
class ReleaseResult:
    """A Release's answer: ``released`` False means nothing had been reserved (the release is
    recorded anyway, so a late Reserve is refused)."""

    order_id: str
    released: bool
    replayed: bool


@dataclass(frozen=True)
class StockLevel:
    """One SKU: ``available + reserved == opening`` (units); price in cents."""

    sku: str
    available: int
    reserved: int
    opening: int
    price_cents: int


@dataclass(frozen=True)
class Reservation:
    """What an order holds (RESERVED) or held and gave back (RELEASED) of one SKU."""

    order_id: str
    sku: str
    quantity: int
    state: str


@dataclass(frozen=True)
class _Answer:
    ok: bool
    error: BusinessError | None


class StockBook:
    """Stock and reservations in the SQLite file ``db_path`` (shared by replicas).

    ``clock`` gives the ``at_unix`` timestamps (seconds since the epoch)."""

    def __init__(self, db_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.db_path = Path(db_path)
        self._clock = clock

    # -- setup ---------------------------------------------------------------------------
    def init(self) -> None:
        """Create the schema and seed opening stock and prices from ``catalog.SKUS``, once.

        Idempotent and safe when several replicas start at once: the seed runs in one
        ``BEGIN IMMEDIATE`` transaction guarded by the ``seeded`` meta row. Raises
        sqlite3.Error / OSError if the file is unusable.
        (``db.connect`` waits out a fresh file's switch to WAL by another replica.)"""
        db.init(self.db_path, SCHEMA)
        with db.tx(self.db_path) as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = 'seeded'").fetchone():
                return
            conn.executemany(
                "INSERT INTO stock (sku, opening, available, reserved, price_cents) "
                "VALUES (?, ?, ?, 0, ?)",
                [(s.sku, s.opening_stock, s.opening_stock, s.price_cents) for s in catalog.SKUS])
            conn.execute("INSERT INTO meta (key, value) VALUES ('seeded', ?)",
                         (str(self._clock()),))

    # -- writes --------------------------------------------------------------------------
    def reserve(self, order_id: str, items: Iterable[tuple[str, int]]) -> ReserveResult:
        """Reserve every ``(sku, quantity)`` of ``order_id``, all or nothing, once.

        Items naming one SKU twice are added up. Returns ReserveResult(reserved=True,
        replayed=False) when the stock was taken now (available -= q, reserved += q, a
        RESERVED reservation row per SKU, in one transaction). A repeated call returns the
        first answer with replayed=True, or re-raises the first refusal; it never reserves
        twice (the items of a repeat are ignored: the first call's answer stands).

        Raises BusinessError:
        - INVALID_ARGUMENT: empty order id, no items, an empty SKU or a quantity <= 0 (not
          recorded);
        - FAILED_PRECONDITION: "out of stock: sku-x (want n, have m)" or "unknown sku: sku-x"
          for the first such SKU (recorded; nothing is reserved);
        - ABORTED: a Release of this order was recorded first (recorded; nothing is reserved).
        """
        wanted = _validate(order_id, items)
        with db.tx(self.db_path) as conn:
            first = _answer(conn, order_id, _STEP_RESERVE)
            if first is not None:
                replayed = True
                answer = first
            else:
                replayed = False
                answer = self._reserve_now(conn, order_id, wanted)
        if answer.error is not None:
            raise answer.error
        return ReserveResult(order_id, True, replayed)

    def _reserve_now(self, conn: sqlite3.Connection, order_id: str,
                     wanted: dict[str, int]) -> _Answer:
        """Decide and apply a first Reserve inside the caller's transaction; record it."""
        error: BusinessError | None = None
        if _answer(conn, order_id, _STEP_RELEASE) is not None:
            error = BusinessError(grpc.StatusCode.ABORTED,
                                  f"order {order_id} was released before it was reserved")
        else:
            for sku, quantity in wanted.items():
                row = conn.execute("SELECT available FROM stock WHERE sku = ?",
                                   (sku,)).fetchone()
                if row is None:
                    error = BusinessError(grpc.StatusCode.FAILED_PRECONDITION,
                                          f"unknown sku: {sku}")
                    break
                if row[0] < quantity:
                    error = BusinessError(grpc.StatusCode.FAILED_PRECONDITION,
                                          f"out of stock: {sku} (want {quantity}, have {row[0]})")
                    break
        now = self._clock()
        if error is None:
            for sku, quantity in wanted.items():
                conn.execute("UPDATE stock SET available = available - ?, "
                             "reserved = reserved + ? WHERE sku = ?", (quantity, quantity, sku))
                conn.execute("INSERT INTO reservations (order_id, sku, quantity, state, at_unix) "
                             "VALUES (?, ?, ?, ?, ?)", (order_id, sku, quantity, RESERVED, now))
        answer = _Answer(error is None, error)
        _record(conn, order_id, _STEP_RESERVE, answer, now)
        return answer

    def release(self, order_id: str) -> ReleaseResult:
        """Give back what ``order_id`` reserved, once.

        If its Reserve succeeded, every RESERVED row of the order goes back to available and
        becomes RELEASED: ReleaseResult(released=True). If no Reserve succeeded (none yet, or
        refused), the release is recorded anyway with released=False, so a late Reserve is
        refused (ABORTED). A repeated call returns the first answer with replayed=True.

        Raises BusinessError(INVALID_ARGUMENT) for an empty order id (not recorded)."""
        if not order_id:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "order_id is required")
        with db.tx(self.db_path) as conn:
            first = _answer(conn, order_id, _STEP_RELEASE)
            if first is not None:
                return ReleaseResult(order_id, first.ok, True)
            reserve = _answer(conn, order_id, _STEP_RESERVE)
            released = reserve is not None and reserve.ok
            if released:
                rows = conn.execute("SELECT sku, quantity FROM reservations "
                                    "WHERE order_id = ? AND state = ?",
                                    (order_id, RESERVED)).fetchall()
                for sku, quantity in rows:
                    conn.execute("UPDATE stock SET available = available + ?, "
                                 "reserved = reserved - ? WHERE sku = ?",
                                 (quantity, quantity, sku))
                conn.execute("UPDATE reservations SET state = ? WHERE order_id = ?",
                             (RELEASED, order_id))
            _record(conn, order_id, _STEP_RELEASE, _Answer(released, None), self._clock())
        return ReleaseResult(order_id, released, False)

    # -- reads ---------------------------------------------------------------------------
    def stock(self, sku: str) -> StockLevel:
        """One SKU's stock; BusinessError(NOT_FOUND) for an unknown SKU."""
        with db.read(self.db_path) as conn:
            row = conn.execute("SELECT sku, available, reserved, opening, price_cents "
                               "FROM stock WHERE sku = ?", (sku,)).fetchone()
        if row is None:
            raise BusinessError(grpc.StatusCode.NOT_FOUND, f"unknown sku: {sku}")
        return StockLevel(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]))

    def reservations(self, order_id: str = "") -> list[Reservation]:
        """Reservation rows of ``order_id`` (``""`` = every order), by order id then SKU."""
        sql = "SELECT order_id, sku, quantity, state FROM reservations"
        args: tuple[str, ...] = ()
        if order_id:
            sql += " WHERE order_id = ?"
            args = (order_id,)
        with db.read(self.db_path) as conn:
            rows = conn.execute(sql + " ORDER BY order_id, sku", args).fetchall()
        return [Reservation(r[0], r[1], int(r[2]), r[3]) for r in rows]

    def summary(self) -> list[StockLevel]:
        """Every SKU's opening, available and reserved units and price, by SKU, read in one
        consistent view."""
        with db.read(self.db_path) as conn:
            rows = conn.execute("SELECT sku, available, reserved, opening, price_cents "
                                "FROM stock ORDER BY sku").fetchall()
        return [StockLevel(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]


def _validate(order_id: str, items: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The wanted quantity per SKU (in first-seen order); BusinessError(INVALID_ARGUMENT)."""
    if not order_id:
        raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "order_id is required")
    wanted: dict[str, int] = {}
    for sku, quantity in items:
        if not sku:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "an item has no sku")
        if quantity <= 0:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"quantity of {sku} must be > 0, got {quantity}")
        wanted[sku] = wanted.get(sku, 0) + quantity
    if not wanted:
        raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "items must not be empty")
    return wanted


def _answer(conn: sqlite3.Connection, order_id: str, step: str) -> _Answer | None:
    """The recorded first answer to ``(order_id, step)``, or None."""
    row = conn.execute("SELECT ok, error_code, error_message FROM answers "
                       "WHERE order_id = ? AND step = ?", (order_id, step)).fetchone()
    if row is None:
        return None
    ok, code, message = row
    error = None if ok or not code else BusinessError(grpc.StatusCode[code], message)
    return _Answer(bool(ok), error)


def _record(conn: sqlite3.Connection, order_id: str, step: str, answer: _Answer,
            now: float) -> None:
    err = answer.error
    conn.execute("INSERT INTO answers (order_id, step, ok, error_code, error_message, at_unix) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (order_id, step, int(answer.ok), err.code.name if err else None,
                  err.message if err else None, now))
