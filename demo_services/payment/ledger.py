"""Payment's business logic over its own SQLite file: customer balances, merchant takings and a
ledger, all in cents. No gRPC server code here (the servicer in ``service.py`` is thin).

Idempotency: every Charge and Refund is keyed by ``(order_id, step)``; the first answer,
success or refusal, is recorded in the same transaction as its effect, and a repeated call
returns (or re-raises) that answer with ``replayed=True`` and moves no money. A Refund that
arrives before its Charge is recorded too, so the late Charge is refused ("cancel before try").

Invariant kept by every transaction: sum of balances + merchant takings == opening total.
Several ``Ledger`` objects (replicas, threads) may share one file: each operation is one
``BEGIN IMMEDIATE`` transaction, so they see one truth.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc

from demo_services.common import catalog, db
from demo_services.common.errors import BusinessError

CHARGE = "CHARGE"
REFUND = "REFUND"
_STEP_CHARGE = "charge"
_STEP_REFUND = "refund"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    customer      TEXT PRIMARY KEY,
    opening_cents INTEGER NOT NULL,
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0)
);
CREATE TABLE IF NOT EXISTS merchant (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    takings_cents INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id     TEXT NOT NULL,
    customer     TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('CHARGE', 'REFUND')),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    at_unix      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_order ON ledger (order_id);
CREATE INDEX IF NOT EXISTS ledger_by_customer ON ledger (customer);
-- The first answer to each (order_id, step): ok = 1 with its amount, or the refusal's status.
CREATE TABLE IF NOT EXISTS answers (
    order_id      TEXT NOT NULL,
    step          TEXT NOT NULL CHECK (step IN ('charge', 'refund')),
    ok            INTEGER NOT NULL,
    customer      TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    at_unix       REAL NOT NULL,
    PRIMARY KEY (order_id, step)
);
"""


@dataclass(frozen=True)
class ChargeResult:
    """A Charge's answer: ``charged`` is always True (a refusal is raised instead)."""

    order_id: str
    charged: bool
    amount_cents: int
    replayed: bool


@dataclass(frozen=True)
class RefundResult:
    """A Refund's answer: ``refunded`` False means nothing had been charged (the refund is
    recorded anyway, so a late Charge is refused); ``amount_cents`` is what went back."""

    order_id: str
    refunded: bool
    amount_cents: int
    replayed: bool


@dataclass(frozen=True)
class LedgerEntry:
    """One money movement: CHARGE (customer → merchant) or REFUND (merchant → customer)."""

    id: int
    order_id: str
    customer: str
    kind: str
    amount_cents: int
    at_unix: float


class PaymentSummary(NamedTuple):
    """Totals for audits: money is conserved iff balances + takings == opening total."""

    opening_total_cents: int
    balances_total_cents: int
    merchant_takings_cents: int
    customers: int


@dataclass(frozen=True)
class _Answer:
    ok: bool
    customer: str
    amount_cents: int
    error: BusinessError | None


class Ledger:
    """Balances, takings and ledger in the SQLite file ``db_path`` (shared by replicas).

    ``clock`` gives the ``at_unix`` timestamps (seconds since the epoch)."""

    def __init__(self, db_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.db_path = Path(db_path)
        self._clock = clock

    # -- setup ---------------------------------------------------------------------------
    def init(self) -> None:
        """Create the schema and seed opening balances from ``catalog.CUSTOMERS``, once.

        Idempotent and safe when several replicas start at once: the seed runs in one
        ``BEGIN IMMEDIATE`` transaction guarded by the ``seeded`` meta row, which also records
        the opening total (cents). Raises sqlite3.Error / OSError if the file is unusable.
        (``db.connect`` waits out a fresh file's switch to WAL by another replica.)"""
        db.init(self.db_path, SCHEMA)
        with db.tx(self.db_path) as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = 'seeded'").fetchone():
                return
            conn.executemany(
                "INSERT INTO accounts (customer, opening_cents, balance_cents) VALUES (?, ?, ?)",
                [(c.name, c.opening_balance_cents, c.opening_balance_cents)
                 for c in catalog.CUSTOMERS])
            conn.execute("INSERT INTO merchant (id, takings_cents) VALUES (1, 0)")
            opening = sum(c.opening_balance_cents for c in catalog.CUSTOMERS)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [("opening_total_cents", str(opening)),
                              ("seeded", str(self._clock()))])

    # -- writes --------------------------------------------------------------------------
    def charge(self, order_id: str, customer: str, amount_cents: int) -> ChargeResult:
        """Move ``amount_cents`` (> 0) from ``customer`` to the merchant's takings, once per
        ``order_id``.

        Returns ChargeResult(charged=True, replayed=False) when the money moved now (with a
        CHARGE ledger row, in the same transaction). A repeated call returns the first answer
        with replayed=True, or re-raises the first refusal; it never moves money twice (the
        customer and amount of a repeat are ignored: the first call's answer stands).

        Raises BusinessError:
        - INVALID_ARGUMENT: empty order id or customer, amount <= 0 (not recorded);
        - FAILED_PRECONDITION: "unknown customer ..." or "insufficient funds: ..." (recorded);
        - ABORTED: a Refund of this order was recorded first (recorded; money never moves).
        """
        if not order_id:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "order_id is required")
        if not customer:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "customer is required")
        if amount_cents <= 0:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"amount_cents must be > 0, got {amount_cents}")
        with db.tx(self.db_path) as conn:
            first = _answer(conn, order_id, _STEP_CHARGE)
            if first is not None:
                replayed = True
                answer = first
            else:
                replayed = False
                answer = self._charge_now(conn, order_id, customer, amount_cents)
        if answer.error is not None:
            raise answer.error
        return ChargeResult(order_id, True, answer.amount_cents, replayed)

    def _charge_now(self, conn: sqlite3.Connection, order_id: str, customer: str,
                    amount_cents: int) -> _Answer:
        """Decide and apply a first Charge inside the caller's transaction; record it."""
        error: BusinessError | None = None
        if _answer(conn, order_id, _STEP_REFUND) is not None:
            error = BusinessError(grpc.StatusCode.ABORTED,
                                  f"order {order_id} was refunded before it was charged")
        else:
            row = conn.execute("SELECT balance_cents FROM accounts WHERE customer = ?",
                               (customer,)).fetchone()
            if row is None:
                error = BusinessError(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"unknown customer {customer}")
            elif row[0] < amount_cents:
                error = BusinessError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"insufficient funds: {customer} has {row[0]} cents, "
                    f"order {order_id} needs {amount_cents}")
        now = self._clock()
        if error is None:
            conn.execute("UPDATE accounts SET balance_cents = balance_cents - ? "
                         "WHERE customer = ?", (amount_cents, customer))
            conn.execute("UPDATE merchant SET takings_cents = takings_cents + ? WHERE id = 1",
                         (amount_cents,))
            conn.execute("INSERT INTO ledger (order_id, customer, kind, amount_cents, at_unix) "
                         "VALUES (?, ?, ?, ?, ?)", (order_id, customer, CHARGE, amount_cents, now))
        answer = _Answer(error is None, customer, amount_cents, error)
        _record(conn, order_id, _STEP_CHARGE, answer, now)
        return answer

    def refund(self, order_id: str) -> RefundResult:
        """Give back what ``order_id`` was charged, once.

        If its Charge succeeded, the amount goes from the merchant's takings back to the
        customer with a REFUND ledger row: RefundResult(refunded=True, amount_cents=amount).
        If no Charge succeeded (none yet, or refused), the refund is recorded anyway with
        refunded=False, amount_cents=0, so a late Charge is refused (ABORTED). A repeated call
        returns the first answer with replayed=True and moves nothing.

        Raises BusinessError(INVALID_ARGUMENT) for an empty order id (not recorded)."""
        if not order_id:
            raise BusinessError(grpc.StatusCode.INVALID_ARGUMENT, "order_id is required")
        with db.tx(self.db_path) as conn:
            first = _answer(conn, order_id, _STEP_REFUND)
            if first is not None:
                return RefundResult(order_id, first.ok, first.amount_cents, True)
            charge = _answer(conn, order_id, _STEP_CHARGE)
            now = self._clock()
            if charge is not None and charge.ok:
                conn.execute("UPDATE accounts SET balance_cents = balance_cents + ? "
                             "WHERE customer = ?", (charge.amount_cents, charge.customer))
                conn.execute("UPDATE merchant SET takings_cents = takings_cents - ? "
                             "WHERE id = 1", (charge.amount_cents,))
                conn.execute(
                    "INSERT INTO ledger (order_id, customer, kind, amount_cents, at_unix) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (order_id, charge.customer, REFUND, charge.amount_cents, now))
                answer = _Answer(True, charge.customer, charge.amount_cents, None)
            else:
                answer = _Answer(False, charge.customer if charge else "", 0, None)
            _record(conn, order_id, _STEP_REFUND, answer, now)
        return RefundResult(order_id, answer.ok, answer.amount_cents, False)

    # -- reads ---------------------------------------------------------------------------
    def balance(self, customer: str) -> int:
        """The customer's balance in cents; BusinessError(NOT_FOUND) for an unknown one."""
        with db.read(self.db_path) as conn:
            row = conn.execute("SELECT balance_cents FROM accounts WHERE customer = ?",
                               (customer,)).fetchone()
        if row is None:
            raise BusinessError(grpc.StatusCode.NOT_FOUND, f"unknown customer {customer}")
        return int(row[0])

    def ledger(self, order_id: str = "", customer: str = "") -> list[LedgerEntry]:
        """Ledger rows in the order they were written, filtered by order and/or customer
        (``""`` = any)."""
        sql = "SELECT id, order_id, customer, kind, amount_cents, at_unix FROM ledger"
        where, args = [], []
        if order_id:
            where.append("order_id = ?")
            args.append(order_id)
        if customer:
            where.append("customer = ?")
            args.append(customer)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with db.read(self.db_path) as conn:
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [LedgerEntry(int(r[0]), r[1], r[2], r[3], int(r[4]), float(r[5])) for r in rows]

    def summary(self) -> PaymentSummary:
        """(opening total, balances total, merchant takings, number of customers), in cents,
        read in one consistent view."""
        with db.read(self.db_path) as conn:
            opening = conn.execute(
                "SELECT value FROM meta WHERE key = 'opening_total_cents'").fetchone()
            balances, customers = conn.execute(
                "SELECT COALESCE(SUM(balance_cents), 0), COUNT(*) FROM accounts").fetchone()
            takings = conn.execute("SELECT takings_cents FROM merchant WHERE id = 1").fetchone()
        return PaymentSummary(int(opening[0]) if opening else 0, int(balances),
                              int(takings[0]) if takings else 0, int(customers))


def _answer(conn: sqlite3.Connection, order_id: str, step: str) -> _Answer | None:
    """The recorded first answer to ``(order_id, step)``, or None."""
    row = conn.execute("SELECT ok, customer, amount_cents, error_code, error_message "
                       "FROM answers WHERE order_id = ? AND step = ?",
                       (order_id, step)).fetchone()
    if row is None:
        return None
    ok, customer, amount, code, message = row
    error = None if ok else (BusinessError(grpc.StatusCode[code], message) if code else None)
    return _Answer(bool(ok), customer, int(amount), error)


def _record(conn: sqlite3.Connection, order_id: str, step: str, answer: _Answer,
            now: float) -> None:
    err = answer.error
    conn.execute("INSERT INTO answers (order_id, step, ok, customer, amount_cents, error_code, "
                 "error_message, at_unix) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (order_id, step, int(answer.ok), answer.customer, answer.amount_cents,
                  err.code.name if err else None, err.message if err else None, now))
