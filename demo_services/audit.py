"""The demo's invariants as a pure function over data fetched from the services' read APIs
(``demo_services.check`` fetches it; unit tests feed it broken data).

1. no order in flight (no PENDING order);
2. CONFIRMED ⇒ charged exactly once (one CHARGE of the order's amount, no REFUND) and stock
   reserved exactly once (RESERVED quantities per SKU equal the order's items);
3. CANCELLED ⇒ net charge zero and nothing reserved;
4. money conserved: balances + merchant takings == opening total, and the ledger's net
   (charges − refunds) equals the takings;
5. stock conserved: per SKU available + reserved == opening, and ``reserved`` equals the
   RESERVED quantities of the reservations;
6. the order read model equals a replay of its events.

Ledger amounts are counted by magnitude (a REFUND gives money back whatever its sign).
Ledger entries and reservations of orders the order service does not know are reported
(``orphans``) but break no invariant: tests and tools may call payment or inventory directly.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Order:
    order_id: str
    state: str                              # PENDING, CONFIRMED, CANCELLED
    amount_cents: int
    items: tuple[tuple[str, int], ...]      # (sku, quantity)
    customer: str = ""
    reason: str = ""


@dataclass(frozen=True)
class LedgerEntry:
    order_id: str
    kind: str                               # CHARGE, REFUND
    amount_cents: int
    customer: str = ""


@dataclass(frozen=True)
class Reservation:
    order_id: str
    sku: str
    quantity: int
    state: str                              # RESERVED, RELEASED


@dataclass(frozen=True)
class Money:
    opening_total_cents: int
    balances_total_cents: int
    merchant_takings_cents: int


@dataclass(frozen=True)
class Stock:
    sku: str
    opening: int
    available: int
    reserved: int


@dataclass(frozen=True)
class AuditData:
    orders: tuple[Order, ...]
    ledger: tuple[LedgerEntry, ...]
    reservations: tuple[Reservation, ...]
    money: Money
    stock: tuple[Stock, ...]
    replay_equal: bool
    replay_detail: str = ""


@dataclass(frozen=True)
class Invariant:
    """One invariant's verdict: its counts, and up to a few examples of what breaks it."""

    name: str
    ok: bool
    counts: dict[str, int]
    problems: tuple[str, ...] = field(default_factory=tuple)


def _verdict(name: str, counts: dict[str, int], problems: list[str],
             total_problems: int | None = None) -> Invariant:
    n = len(problems) if total_problems is None else total_problems
    shown = problems[:MAX_EXAMPLES]
    if n > len(shown):
        shown.append(f"... and {n - len(shown)} more")
    return Invariant(name, n == 0, counts, tuple(shown))


def _per_sku(items: Iterable[tuple[str, int]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for sku, qty in items:
        out[sku] += qty
    return {k: v for k, v in out.items() if v}


def _index(data: AuditData) -> tuple[dict[str, list[LedgerEntry]], dict[str, list[Reservation]]]:
    ledger: dict[str, list[LedgerEntry]] = defaultdict(list)
    for e in data.ledger:
        ledger[e.order_id].append(e)
    res: dict[str, list[Reservation]] = defaultdict(list)
    for r in data.reservations:
        res[r.order_id].append(r)
    return ledger, res


def _net(entries: Iterable[LedgerEntry]) -> int:
    return sum(abs(e.amount_cents) if e.kind == "CHARGE" else
               -abs(e.amount_cents) if e.kind == "REFUND" else 0 for e in entries)


def _reserved(rows: Iterable[Reservation]) -> dict[str, int]:
    return _per_sku((r.sku, r.quantity) for r in rows if r.state == "RESERVED")


def no_order_in_flight(data: AuditData) -> Invariant:
    pending = [o.order_id for o in data.orders if o.state not in ("CONFIRMED", "CANCELLED")]
    return _verdict("no order in flight", {"orders": len(data.orders), "in_flight": len(pending)},
                    [f"order {oid} is not terminal" for oid in pending])


def confirmed_charged_and_reserved_once(data: AuditData) -> Invariant:
    ledger, res = _index(data)
    confirmed = [o for o in data.orders if o.state == "CONFIRMED"]
    problems = []
    for o in confirmed:
        entries = ledger.get(o.order_id, [])
        charges = [e for e in entries if e.kind == "CHARGE"]
        refunds = [e for e in entries if e.kind == "REFUND"]
        if len(charges) != 1:
            problems.append(f"order {o.order_id}: charged {len(charges)} times")
        elif abs(charges[0].amount_cents) != o.amount_cents:
            problems.append(f"order {o.order_id}: charged {charges[0].amount_cents}, "
                            f"amount {o.amount_cents}")
        if refunds:
            problems.append(f"order {o.order_id}: confirmed but refunded")
        got, want = _reserved(res.get(o.order_id, [])), _per_sku(o.items)
        if got != want:
            problems.append(f"order {o.order_id}: reserved {got}, ordered {want}")
    return _verdict("CONFIRMED => charged once, stock reserved once",
                    {"confirmed": len(confirmed)}, problems)


def cancelled_compensated(data: AuditData) -> Invariant:
    ledger, res = _index(data)
    cancelled = [o for o in data.orders if o.state == "CANCELLED"]
    problems = []
    refunded = 0
    for o in cancelled:
        entries = ledger.get(o.order_id, [])
        net = _net(entries)
        if net != 0:
            problems.append(f"order {o.order_id}: net charge {net}")
        elif any(e.kind == "CHARGE" for e in entries):
            refunded += 1
        got = _reserved(res.get(o.order_id, []))
        if got:
            problems.append(f"order {o.order_id}: still reserved {got}")
    return _verdict("CANCELLED => net charge zero, nothing reserved",
                    {"cancelled": len(cancelled), "charged_then_refunded": refunded}, problems)


def money_conserved(data: AuditData) -> Invariant:
    m = data.money
    problems = []
    if m.balances_total_cents + m.merchant_takings_cents != m.opening_total_cents:
        problems.append(f"balances {m.balances_total_cents} + takings "
                        f"{m.merchant_takings_cents} != opening {m.opening_total_cents} "
                        f"(off by {m.balances_total_cents + m.merchant_takings_cents - m.opening_total_cents})")
    ledger_net = _net(data.ledger)
    if ledger_net != m.merchant_takings_cents:
        problems.append(f"ledger net {ledger_net} != takings {m.merchant_takings_cents}")
    return _verdict("money conserved", {"opening_cents": m.opening_total_cents,
                                        "balances_cents": m.balances_total_cents,
                                        "takings_cents": m.merchant_takings_cents,
                                        "ledger_net_cents": ledger_net}, problems)


def stock_conserved(data: AuditData) -> Invariant:
    reserved_rows = _reserved(data.reservations)
    problems = []
    for s in data.stock:
        if s.available + s.reserved != s.opening:
            problems.append(f"{s.sku}: available {s.available} + reserved {s.reserved} != "
                            f"opening {s.opening}")
        if s.reserved != reserved_rows.get(s.sku, 0):
            problems.append(f"{s.sku}: reserved {s.reserved}, reservations say "
                            f"{reserved_rows.get(s.sku, 0)}")
    unknown = sorted(set(reserved_rows) - {s.sku for s in data.stock})
    problems += [f"{sku}: reserved but not in stock" for sku in unknown]
    return _verdict("stock conserved", {
        "skus": len(data.stock), "opening": sum(s.opening for s in data.stock),
        "available": sum(s.available for s in data.stock),
        "reserved": sum(s.reserved for s in data.stock)}, problems)


def replay_equal(data: AuditData) -> Invariant:
    return _verdict("read model equals a replay", {"orders": len(data.orders)},
                    [] if data.replay_equal else [data.replay_detail or "replay differs"])


CHECKS = (no_order_in_flight, confirmed_charged_and_reserved_once, cancelled_compensated,
          money_conserved, stock_conserved, replay_equal)


def audit(data: AuditData) -> list[Invariant]:
    """Every invariant's verdict, in the order of the module doc. Pure."""
    return [check(data) for check in CHECKS]


def orphans(data: AuditData) -> dict[str, int]:
    """Ledger entries and reservations whose order the order service does not know: how many
    orders, their net charge and what they hold reserved (informational)."""
    known = {o.order_id for o in data.orders}
    ledger = [e for e in data.ledger if e.order_id not in known]
    res = [r for r in data.reservations if r.order_id not in known]
    return {"orders": len({e.order_id for e in ledger} | {r.order_id for r in res}),
            "net_charge_cents": _net(ledger),
            "reserved": sum(_reserved(res).values())}
