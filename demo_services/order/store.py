"""Order's database: the event log and read model (``events.py``) plus the durable saga log
with leases, and the transactions that change them together.

A saga row holds the saga's state (``saga.SagaState``), when its next attempt may run
(``next_at_unix``, the backoff), and its lease: ``lease_owner`` (a replica's runner id) until
``lease_until_unix``. A replica claims a saga in one transaction; every claim bumps
``revision``, the fencing token: ``commit`` stores a step's outcome (event + read model + saga
state, one transaction) only if the caller still owns the lease and saw the latest revision, so
a replica that lost its lease (stalled, partitioned, presumed dead) cannot write over the one
that took the saga over.

Times are unix seconds passed in by the caller (one clock shared by the replicas on a host):
the store never reads a clock.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo_services.common import db as dbm

from . import events as ev
from .saga import Decision, SagaState, Step, start

SAGAS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sagas (
    order_id         TEXT PRIMARY KEY,
    step             TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    step_since_unix  REAL NOT NULL,
    reason           TEXT NOT NULL DEFAULT '',
    reserve_open     INTEGER NOT NULL DEFAULT 0,
    charge_open      INTEGER NOT NULL DEFAULT 0,
    next_at_unix     REAL NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_until_unix REAL NOT NULL DEFAULT 0,
    revision         INTEGER NOT NULL DEFAULT 0,
    created_unix     REAL NOT NULL,
    updated_unix     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_open_by_lease ON sagas(lease_until_unix)
    WHERE step NOT IN ('CONFIRMED', 'CANCELLED');
"""

SCHEMA = ev.SCHEMA + SAGAS_SCHEMA
_OPEN = "step NOT IN ('CONFIRMED', 'CANCELLED')"


@dataclass(frozen=True)
class SagaRecord:
    """A saga row: its state, when the next attempt may run, its lease and fencing revision."""

    state: SagaState
    next_at_unix: float
    lease_owner: str | None
    lease_until_unix: float
    revision: int
    updated_unix: float


@dataclass(frozen=True)
class OrderInputs:
    """What the saga needs from the order (from its OrderCreated event)."""

    customer: str
    items: ev.Items
    amount_cents: int


_SAGA_SELECT = ("SELECT order_id, step, attempts, step_since_unix, reason, reserve_open, "
                "charge_open, next_at_unix, lease_owner, lease_until_unix, revision, "
                "updated_unix FROM sagas")


def _record(row: tuple[Any, ...]) -> SagaRecord:
    (order_id, step, attempts, since, reason, reserve_open, charge_open, next_at, owner,
     until, revision, updated) = row
    state = SagaState(order_id=order_id, step=Step(step), attempts=attempts,
                      step_since_unix=since, reason=reason, reserve_open=bool(reserve_open),
                      charge_open=bool(charge_open))
    return SagaRecord(state, next_at, owner, until, revision, updated)


class OrderStore:
    """Order's SQLite database (WAL, shared by the replicas). Every method is one short
    transaction on its own connection, so it is safe from any thread or process."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)

    def init(self) -> None:
        """Create the file and tables if missing (idempotent)."""
        dbm.init(self.db_path, SCHEMA)

    # ------------------------------------------------------------------ orders

    def create_order(self, *, order_id: str, request_id: str, customer: str, items: ev.Items,
                     amount_cents: int, owner: str, now_unix: float, lease_s: float,
                     by: str = "") -> tuple[ev.OrderView, bool]:
        """The order for ``request_id``: ``(view, True)`` if this call created it (OrderCreated
        appended, read model row and saga row inserted, the saga leased to ``owner``, all in
        one transaction), ``(existing view, False)`` if the request id was seen before
        (``order_id`` unused). Never creates two orders for one request id, even racing."""
        for _ in range(2):
            try:
                with dbm.tx(self.db_path) as db:
                    existing = ev.order_id_for_request(db, request_id)
                    if existing is not None:
                        view = ev.load_view(db, existing)
                        assert view is not None, f"order {existing} has no read-model row"
                        return view, False
                    _, view = ev.append(
                        db, order_id, ev.EventType.ORDER_CREATED,
                        {"request_id": request_id, "customer": customer,
                         "items": [list(i) for i in items], "amount_cents": amount_cents,
                         "by": by},
                        now_unix, request_id=request_id)
                    state = start(order_id, now_unix)
                    db.execute(
                        "INSERT INTO sagas (order_id, step, attempts, step_since_unix, "
                        "next_at_unix, lease_owner, lease_until_unix, revision, created_unix, "
                        "updated_unix) VALUES (?, ?, 0, ?, 0, ?, ?, 0, ?, ?)",
                        (order_id, state.step.value, now_unix, owner, now_unix + lease_s,
                         now_unix, now_unix))
                    return view, True
            except sqlite3.IntegrityError:
                # The unique request id index caught a race the BEGIN IMMEDIATE lookup did
                # not (it cannot with one database file; kept as the last word): look again.
                continue
        raise RuntimeError(f"request {request_id!r}: could not create or find its order")

    def get(self, order_id: str) -> ev.OrderView | None:
        with dbm.read(self.db_path) as db:
            return ev.load_view(db, order_id)

    def list_orders(self, state: str = "", after_seq: int = 0,
                    limit: int = 100) -> list[ev.OrderView]:
        """Read-model views in creation order after ``after_seq``, of ``state`` if given."""
        with dbm.read(self.db_path) as db:
            return ev.load_views(db, state, after_seq, limit)

    def events(self, order_id: str, after_version: int = 0) -> list[ev.Event]:
        with dbm.read(self.db_path) as db:
            return ev.load_events(db, order_id, after_version)

    def order_inputs(self, order_id: str) -> OrderInputs | None:
        """Customer, items and amount from the order's OrderCreated event (None: unknown)."""
        with dbm.read(self.db_path) as db:
            row = db.execute("SELECT data FROM events WHERE order_id = ? AND version = 1",
                             (order_id,)).fetchone()
        if row is None:
            return None
        created = ev.Event(0, order_id, 1, ev.EventType.ORDER_CREATED,
                           json.loads(row[0]))
        view = ev.apply(None, created)
        return OrderInputs(view.customer, view.items, view.amount_cents)

    # ------------------------------------------------------------------ sagas

    def load_saga(self, order_id: str) -> SagaRecord | None:
        with dbm.read(self.db_path) as db:
            row = db.execute(f"{_SAGA_SELECT} WHERE order_id = ?", (order_id,)).fetchone()
        return None if row is None else _record(row)

    def claim(self, order_id: str, owner: str, now_unix: float, lease_s: float) -> bool:
        """Take the lease of an open saga that nobody holds or whose lease expired (bumping its
        revision). False if it is terminal, unknown, or leased to someone else."""
        with dbm.tx(self.db_path) as db:
            cur = db.execute(
                f"UPDATE sagas SET lease_owner = ?, lease_until_unix = ?, "
                f"revision = revision + 1 WHERE order_id = ? AND {_OPEN} "
                f"AND (lease_owner IS NULL OR lease_until_unix < ?)",
                (owner, now_unix + lease_s, order_id, now_unix))
            return cur.rowcount == 1

    def claim_expired(self, owner: str, now_unix: float, lease_s: float, limit: int = 100,
                      exclude: Collection[str] = ()) -> list[str]:
        """Claim up to ``limit`` open sagas whose lease expired or that nobody holds, oldest
        lease first, skipping ``exclude`` (sagas this replica is already running). One
        transaction: two replicas scanning at once never claim the same saga."""
        with dbm.tx(self.db_path) as db:
            rows = db.execute(
                f"SELECT order_id FROM sagas WHERE {_OPEN} "
                f"AND (lease_owner IS NULL OR lease_until_unix < ?) "
                f"ORDER BY lease_until_unix, order_id LIMIT ?",
                (now_unix, limit + len(exclude))).fetchall()
            claimed = [r[0] for r in rows if r[0] not in exclude][:limit]
            for order_id in claimed:
                db.execute("UPDATE sagas SET lease_owner = ?, lease_until_unix = ?, "
                           "revision = revision + 1 WHERE order_id = ?",
                           (owner, now_unix + lease_s, order_id))
            return claimed

    def renew(self, order_id: str, owner: str, now_unix: float, lease_s: float) -> bool:
        """Extend ``owner``'s lease to ``now_unix + lease_s``. False if the saga is terminal or
        someone else holds it now (an expired lease nobody took is still ours)."""
        with dbm.tx(self.db_path) as db:
            cur = db.execute(f"UPDATE sagas SET lease_until_unix = ? WHERE order_id = ? "
                             f"AND lease_owner = ? AND {_OPEN}",
                             (now_unix + lease_s, order_id, owner))
            return cur.rowcount == 1

    def release(self, order_ids: Sequence[str] | None, owner: str) -> int:
        """Give up ``owner``'s leases (all of them if ``order_ids`` is None) so any replica
        resumes those sagas at once; returns how many."""
        with dbm.tx(self.db_path) as db:
            if order_ids is None:
                cur = db.execute(f"UPDATE sagas SET lease_owner = NULL, lease_until_unix = 0 "
                                 f"WHERE lease_owner = ? AND {_OPEN}", (owner,))
                return cur.rowcount
            n = 0
            for order_id in order_ids:
                n += db.execute("UPDATE sagas SET lease_owner = NULL, lease_until_unix = 0 "
                                "WHERE order_id = ? AND lease_owner = ?",
                                (order_id, owner)).rowcount
            return n

    def commit(self, order_id: str, owner: str, revision: int, decision: Decision,
               now_unix: float, lease_s: float, by: str = "") -> ev.OrderView | None:
        """Store one step's outcome: append ``decision.event`` (if any) with its read-model
        update, and the saga's new state (next attempt at ``now_unix + decision.delay_s``,
        lease renewed), in one transaction. Returns the order's view, or None without writing
        anything if ``owner`` no longer holds the saga at ``revision`` (fenced)."""
        state = decision.state
        with dbm.tx(self.db_path) as db:
            row = db.execute("SELECT lease_owner, revision FROM sagas WHERE order_id = ?",
                             (order_id,)).fetchone()
            if row is None or row[0] != owner or row[1] != revision:
                return None
            if decision.event is not None:
                type_, data = decision.event
                _, view = ev.append(db, order_id, type_, {**data, "by": by}, now_unix)
            else:
                view = ev.load_view(db, order_id)
            db.execute(
                "UPDATE sagas SET step = ?, attempts = ?, step_since_unix = ?, reason = ?, "
                "reserve_open = ?, charge_open = ?, next_at_unix = ?, lease_until_unix = ?, "
                "updated_unix = ? WHERE order_id = ?",
                (state.step.value, state.attempts, state.step_since_unix, state.reason,
                 int(state.reserve_open), int(state.charge_open), now_unix + decision.delay_s,
                 0.0 if state.terminal else now_unix + lease_s, now_unix, order_id))
            return view

    def saga_counts(self, owner: str | None = None, now_unix: float = 0.0) -> dict[str, Any]:
        """``{"by_step": {step: n}, "in_flight": open sagas, "leased_by_owner": open sagas
        ``owner`` holds unexpired at ``now_unix``}``."""
        with dbm.read(self.db_path) as db:
            by_step = {r[0]: r[1] for r in db.execute(
                "SELECT step, COUNT(*) FROM sagas GROUP BY step ORDER BY step")}
            leased = 0
            if owner is not None:
                leased = db.execute(f"SELECT COUNT(*) FROM sagas WHERE {_OPEN} AND "
                                    f"lease_owner = ? AND lease_until_unix >= ?",
                                    (owner, now_unix)).fetchone()[0]
        in_flight = sum(n for s, n in by_step.items() if not Step(s).terminal)
        return {"by_step": by_step, "in_flight": in_flight, "leased_by_owner": leased}
