"""Orders are event-sourced: an append-only ``events`` table is the truth; the ``orders`` table
is a read model (CQRS) built from it by the pure projector ``apply`` and updated in the same
transaction that appends each event.

    OrderCreated(request_id, customer, items, amount_cents)
    StockReserved | ReserveFailed(reason, code, ambiguous)
    PaymentCharged(amount_cents) | ChargeFailed(reason, code, ambiguous)
    OrderConfirmed
    PaymentRefunded(refunded, amount_cents), StockReleased(released), OrderCancelled(reason)

``rebuild_check(db_path)`` replays every event into a fresh read model (an in-memory database
with the same schema, written by the same code) and compares it with the live one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from demo_services.common import db as dbm


class EventType(StrEnum):
    ORDER_CREATED = "OrderCreated"
    STOCK_RESERVED = "StockReserved"
    RESERVE_FAILED = "ReserveFailed"
    PAYMENT_CHARGED = "PaymentCharged"
    CHARGE_FAILED = "ChargeFailed"
    ORDER_CONFIRMED = "OrderConfirmed"
    STOCK_RELEASED = "StockReleased"
    PAYMENT_REFUNDED = "PaymentRefunded"
    ORDER_CANCELLED = "OrderCancelled"


PENDING = "PENDING"
CONFIRMED = "CONFIRMED"
CANCELLED = "CANCELLED"
ORDER_STATES = (PENDING, CONFIRMED, CANCELLED)
TERMINAL_STATES = frozenset({CONFIRMED, CANCELLED})

Items = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Event:
    """One fact about one order. ``version`` counts the order's events from 1; ``seq`` is the
    event's position in the whole log; ``at_unix`` when it was appended (seconds)."""

    seq: int
    order_id: str
    version: int
    type: EventType
    data: Mapping[str, Any] = field(default_factory=dict)
    at_unix: float = 0.0


@dataclass(frozen=True)
class OrderView:
    """The read model of one order. ``state`` is PENDING, CONFIRMED or CANCELLED; ``reason``
    why it was (or is being) cancelled; ``version`` the number of events applied; ``seq`` the
    log position of its OrderCreated (ListOrders' stable order)."""

    order_id: str
    request_id: str
    customer: str
    items: Items
    amount_cents: int
    state: str
    reason: str
    created_at_unix: float
    updated_at_unix: float
    version: int
    seq: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class ProjectionError(ValueError):
    """An event that cannot follow the view it is applied to (a corrupt or foreign log)."""


_KEEP_STATE = frozenset({EventType.STOCK_RESERVED, EventType.PAYMENT_CHARGED,
                         EventType.STOCK_RELEASED, EventType.PAYMENT_REFUNDED})


def apply(view: OrderView | None, event: Event) -> OrderView:
    """The view after ``event``: pure, deterministic (times come from the event).

    ``view`` is None before the order's first event. Raises ProjectionError if the event does
    not follow the view (not version + 1, nothing before OrderCreated, nothing after a
    terminal state, an unknown type)."""
    if event.type is EventType.ORDER_CREATED:
        if view is not None:
            raise ProjectionError(f"order {event.order_id}: OrderCreated twice")
        if event.version != 1:
            raise ProjectionError(f"order {event.order_id}: OrderCreated at version "
                                  f"{event.version}")
        d = event.data
        return OrderView(
            order_id=event.order_id, request_id=str(d["request_id"]),
            customer=str(d["customer"]),
            items=tuple((str(sku), int(qty)) for sku, qty in d["items"]),
            amount_cents=int(d["amount_cents"]), state=PENDING, reason="",
            created_at_unix=event.at_unix, updated_at_unix=event.at_unix, version=1,
            seq=event.seq)
    if view is None:
        raise ProjectionError(f"order {event.order_id}: {event.type} before OrderCreated")
    if event.version != view.version + 1:
        raise ProjectionError(f"order {event.order_id}: event version {event.version} after "
                              f"version {view.version}")
    if view.terminal:
        raise ProjectionError(f"order {event.order_id}: {event.type} after {view.state}")
    base = replace(view, version=event.version, updated_at_unix=event.at_unix)
    if event.type in _KEEP_STATE:
        return base
    if event.type in (EventType.RESERVE_FAILED, EventType.CHARGE_FAILED):
        return replace(base, reason=str(event.data.get("reason", "")))
    if event.type is EventType.ORDER_CONFIRMED:
        return replace(base, state=CONFIRMED, reason="")
    if event.type is EventType.ORDER_CANCELLED:
        return replace(base, state=CANCELLED, reason=str(event.data.get("reason", "")))
    raise ProjectionError(f"order {event.order_id}: unknown event type {event.type!r}")


def replay(events: Iterable[Event]) -> dict[str, OrderView]:
    """Fold events (in log order) into views by order id; raises ProjectionError."""
    views: dict[str, OrderView] = {}
    for event in events:
        views[event.order_id] = apply(views.get(event.order_id), event)
    return views


# --------------------------------------------------------------------------- storage

EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id   TEXT NOT NULL,
    version    INTEGER NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT NOT NULL,
    at_unix    REAL NOT NULL,
    request_id TEXT,            -- OrderCreated only: the caller's idempotency key
    UNIQUE (order_id, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_request_id ON events(request_id)
    WHERE request_id IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"""

READ_MODEL_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id        TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL,
    customer        TEXT NOT NULL,
    items           TEXT NOT NULL,
    amount_cents    INTEGER NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT NOT NULL,
    created_at_unix REAL NOT NULL,
    updated_at_unix REAL NOT NULL,
    version         INTEGER NOT NULL,
    seq             INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS orders_request_id ON orders(request_id);
CREATE UNIQUE INDEX IF NOT EXISTS orders_seq ON orders(seq);
CREATE INDEX IF NOT EXISTS orders_state_seq ON orders(state, seq);
"""

SCHEMA = EVENTS_SCHEMA + READ_MODEL_SCHEMA
VIEW_COLUMNS = tuple(f.name for f in fields(OrderView))


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _event_from_row(row: tuple[Any, ...]) -> Event:
    seq, order_id, version, type_, data, at_unix = row
    return Event(seq=seq, order_id=order_id, version=version, type=EventType(type_),
                 data=json.loads(data), at_unix=at_unix)


def _view_from_row(row: tuple[Any, ...]) -> OrderView:
    values = dict(zip(VIEW_COLUMNS, row, strict=True))
    values["items"] = tuple((str(s), int(q)) for s, q in json.loads(values["items"]))
    return OrderView(**values)


def put_view(db: sqlite3.Connection, view: OrderView) -> None:
    """Insert or replace ``view`` in the read model (inside the caller's transaction)."""
    values = [getattr(view, c) for c in VIEW_COLUMNS]
    values[VIEW_COLUMNS.index("items")] = json.dumps([list(i) for i in view.items])
    db.execute(f"INSERT OR REPLACE INTO orders ({', '.join(VIEW_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in VIEW_COLUMNS)})", values)


_EVENT_SELECT = "SELECT seq, order_id, version, type, data, at_unix FROM events"
_VIEW_SELECT = f"SELECT {', '.join(VIEW_COLUMNS)} FROM orders"


def append(db: sqlite3.Connection, order_id: str, type_: EventType, data: Mapping[str, Any],
           at_unix: float, request_id: str | None = None) -> tuple[Event, OrderView]:
    """Append one event to the order's stream and update its read-model row, inside the
    caller's write transaction (so both or neither are stored).

    ``request_id`` is stored (unique) with an OrderCreated: a second OrderCreated with the same
    request id raises sqlite3.IntegrityError. Raises ProjectionError if the event cannot follow
    the current view."""
    view = load_view(db, order_id)
    version = 1 if view is None else view.version + 1
    cur = db.execute("INSERT INTO events (order_id, version, type, data, at_unix, request_id) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (order_id, version, str(type_), _dumps(data), at_unix, request_id))
    seq = cur.lastrowid
    assert seq is not None
    event = Event(seq=seq, order_id=order_id, version=version, type=type_,
                  data=json.loads(_dumps(data)), at_unix=at_unix)
    new_view = apply(view, event)
    put_view(db, new_view)
    return event, new_view


def load_view(db: sqlite3.Connection, order_id: str) -> OrderView | None:
    row = db.execute(f"{_VIEW_SELECT} WHERE order_id = ?", (order_id,)).fetchone()
    return None if row is None else _view_from_row(row)


def load_views(db: sqlite3.Connection, state: str = "", after_seq: int = 0,
               limit: int = 100) -> list[OrderView]:
    """Views in log order (``seq`` > ``after_seq``), optionally of one ``state``."""
    if state:
        rows = db.execute(f"{_VIEW_SELECT} WHERE state = ? AND seq > ? ORDER BY seq LIMIT ?",
                          (state, after_seq, limit))
    else:
        rows = db.execute(f"{_VIEW_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?",
                          (after_seq, limit))
    return [_view_from_row(r) for r in rows]


def order_id_for_request(db: sqlite3.Connection, request_id: str) -> str | None:
    """The order created for ``request_id``, from the event log (the truth)."""
    row = db.execute("SELECT order_id FROM events WHERE request_id = ?",
                     (request_id,)).fetchone()
    return None if row is None else str(row[0])


def load_events(db: sqlite3.Connection, order_id: str | None = None,
                after_version: int = 0) -> list[Event]:
    """Events in log order: all of them, or one order's after ``after_version``."""
    if order_id is None:
        rows = db.execute(f"{_EVENT_SELECT} ORDER BY seq")
    else:
        rows = db.execute(f"{_EVENT_SELECT} WHERE order_id = ? AND version > ? ORDER BY seq",
                          (order_id, after_version))
    return [_event_from_row(r) for r in rows]


# --------------------------------------------------------------------------- rebuild


@dataclass(frozen=True)
class RebuildReport:
    """``equal``: the replayed read model equals the live one; ``differences``: one line each
    (at most ``MAX_DIFFERENCES``, then a count of the rest)."""

    equal: bool
    events: int
    orders: int
    differences: tuple[str, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {"equal": self.equal, "events": self.events, "orders": self.orders,
                "differences": list(self.differences)}


MAX_DIFFERENCES = 50


def compare(live: Mapping[str, OrderView], replayed: Mapping[str, OrderView]) -> list[str]:
    """Every difference between two read models, one line each, sorted by order id."""
    out: list[str] = []
    for order_id in sorted(set(live) | set(replayed)):
        a, b = live.get(order_id), replayed.get(order_id)
        if a is None:
            out.append(f"order {order_id}: missing from the live read model")
        elif b is None:
            out.append(f"order {order_id}: in the live read model but has no events")
        elif a != b:
            diffs = [f"{c} live={getattr(a, c)!r} replay={getattr(b, c)!r}"
                     for c in VIEW_COLUMNS if getattr(a, c) != getattr(b, c)]
            out.append(f"order {order_id}: " + "; ".join(diffs))
    return out


def _fresh_read_model(views: Iterable[OrderView]) -> dict[str, OrderView]:
    """Write ``views`` into an empty in-memory read model and read them back (so the replay
    goes through the same storage code as the live one)."""
    mem = sqlite3.connect(":memory:", isolation_level=None)
    try:
        mem.executescript(READ_MODEL_SCHEMA)
        mem.execute("BEGIN")
        for view in views:
            put_view(mem, view)
        mem.execute("COMMIT")
        return {v.order_id: v for v in map(_view_from_row, mem.execute(_VIEW_SELECT))}
    finally:
        mem.close()


def rebuild_check(db_path: str | Path) -> RebuildReport:
    """Replay every event of order's database at ``db_path`` into a fresh read model and
    compare it with the live one, both read in one transaction (a consistent snapshot while
    replicas keep writing). Never writes. Raises sqlite3.Error if the database cannot be read
    (a missing file, a missing table)."""
    if not Path(db_path).exists():
        raise sqlite3.OperationalError(f"no database at {db_path}")
    with dbm.read(db_path) as db:
        events = load_events(db)
        live = {v.order_id: v for v in map(_view_from_row, db.execute(_VIEW_SELECT))}
    try:
        replayed = _fresh_read_model(replay(events).values())
    except ProjectionError as exc:
        return RebuildReport(False, len(events), len(live), (f"replay failed: {exc}",))
    diffs = compare(live, replayed)
    if len(diffs) > MAX_DIFFERENCES:
        diffs = [*diffs[:MAX_DIFFERENCES], f"... and {len(diffs) - MAX_DIFFERENCES} more"]
    return RebuildReport(not diffs, len(events), len(live), tuple(diffs))
