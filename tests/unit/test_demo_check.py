"""The demo's audit (``demo_services.audit``) as a pure function: a consistent data set
passes every invariant, and each kind of broken data fails exactly the invariant it breaks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from demo_services.audit import (
    AuditData,
    LedgerEntry,
    Money,
    Order,
    Reservation,
    Stock,
    audit,
    orphans,
)

NAMES = ("no order in flight", "CONFIRMED => charged once, stock reserved once",
         "CANCELLED => net charge zero, nothing reserved", "money conserved", "stock conserved",
         "read model equals a replay")


def consistent() -> AuditData:
    """o-1 confirmed; o-2 declined (reserved, released); o-3 out of stock; o-4 charged,
    then compensated (refunded, released)."""
    orders = (
        Order("o-1", "CONFIRMED", 240, (("sku-apple", 2),), "cust-01"),
        Order("o-2", "CANCELLED", 350, (("sku-bread", 1),), "cust-broke", "insufficient funds"),
        Order("o-3", "CANCELLED", 9900, (("sku-truffle", 1),), "cust-02", "out of stock"),
        Order("o-4", "CANCELLED", 120, (("sku-apple", 1),), "cust-03", "timeout"),
    )
    ledger = (LedgerEntry("o-1", "CHARGE", 240, "cust-01"),
              LedgerEntry("o-4", "CHARGE", 120, "cust-03"),
              LedgerEntry("o-4", "REFUND", 120, "cust-03"))
    reservations = (Reservation("o-1", "sku-apple", 2, "RESERVED"),
                    Reservation("o-2", "sku-bread", 1, "RELEASED"),
                    Reservation("o-4", "sku-apple", 1, "RELEASED"))
    money = Money(opening_total_cents=10_000, balances_total_cents=9_760,
                  merchant_takings_cents=240)
    stock = (Stock("sku-apple", 100, 98, 2), Stock("sku-bread", 50, 50, 0),
             Stock("sku-truffle", 0, 0, 0))
    return AuditData(tuple(orders), ledger, reservations, money, stock, replay_equal=True)


def failed(data: AuditData) -> set[str]:
    return {inv.name for inv in audit(data) if not inv.ok}


def test_consistent_data_passes_every_invariant_with_counts() -> None:
    results = audit(consistent())
    assert [r.name for r in results] == list(NAMES)
    assert all(r.ok and not r.problems for r in results), results
    by_name = {r.name: r for r in results}
    assert by_name[NAMES[0]].counts == {"orders": 4, "in_flight": 0}
    assert by_name[NAMES[1]].counts == {"confirmed": 1}
    assert by_name[NAMES[2]].counts == {"cancelled": 3, "charged_then_refunded": 1}
    assert by_name[NAMES[3]].counts["ledger_net_cents"] == 240


def test_a_pending_order_breaks_no_order_in_flight() -> None:
    d = consistent()
    d = replace(d, orders=(*d.orders, Order("o-5", "PENDING", 120, (("sku-apple", 1),))))
    assert failed(d) == {NAMES[0]}
    inv = audit(d)[0]
    assert inv.counts["in_flight"] == 1 and "o-5" in inv.problems[0]


@pytest.mark.parametrize("ledger_change", ["charged twice", "never charged", "wrong amount",
                                           "refunded"])
def test_a_confirmed_order_not_charged_exactly_once_breaks_the_confirmed_invariant(
        ledger_change: str) -> None:
    d = consistent()
    ledger = list(d.ledger)
    takings = d.money.merchant_takings_cents
    balances = d.money.balances_total_cents
    if ledger_change == "charged twice":
        ledger.append(LedgerEntry("o-1", "CHARGE", 240))
        takings, balances = takings + 240, balances - 240
    elif ledger_change == "never charged":
        ledger.remove(LedgerEntry("o-1", "CHARGE", 240, "cust-01"))
        takings, balances = takings - 240, balances + 240
    elif ledger_change == "wrong amount":
        ledger[0] = LedgerEntry("o-1", "CHARGE", 241, "cust-01")
        takings, balances = takings + 1, balances - 1
    else:
        ledger.append(LedgerEntry("o-1", "REFUND", 240))
        takings, balances = takings - 240, balances + 240
    # money stays conserved: only the per-order invariant sees it
    d = replace(d, ledger=tuple(ledger), money=Money(d.money.opening_total_cents, balances,
                                                     takings))
    assert failed(d) == {NAMES[1]}, ledger_change


@pytest.mark.parametrize("rows", [
    (Reservation("o-1", "sku-apple", 2, "RESERVED"), Reservation("o-1", "sku-apple", 2, "RESERVED")),
    (Reservation("o-1", "sku-apple", 2, "RELEASED"),),
    (Reservation("o-1", "sku-apple", 1, "RESERVED"),),
])
def test_a_confirmed_order_not_reserved_exactly_once_breaks_the_confirmed_invariant(
        rows: tuple[Reservation, ...]) -> None:
    d = consistent()
    others = tuple(r for r in d.reservations if r.order_id != "o-1")
    reserved = sum(r.quantity for r in rows if r.state == "RESERVED")
    stock = (Stock("sku-apple", 100, 100 - reserved, reserved), *d.stock[1:])
    d = replace(d, reservations=others + rows, stock=stock)
    assert failed(d) == {NAMES[1]}


def test_a_cancelled_order_with_money_kept_breaks_the_cancelled_invariant() -> None:
    d = consistent()
    ledger = tuple(e for e in d.ledger if not (e.order_id == "o-4" and e.kind == "REFUND"))
    m = d.money
    d = replace(d, ledger=ledger, money=Money(m.opening_total_cents,
                                              m.balances_total_cents - 120,
                                              m.merchant_takings_cents + 120))
    assert failed(d) == {NAMES[2]}
    assert any("o-4: net charge 120" in p for p in audit(d)[2].problems)


def test_a_cancelled_order_still_holding_stock_breaks_the_cancelled_invariant() -> None:
    d = consistent()
    res = tuple(Reservation(r.order_id, r.sku, r.quantity, "RESERVED") if r.order_id == "o-2"
                else r for r in d.reservations)
    stock = (d.stock[0], Stock("sku-bread", 50, 49, 1), d.stock[2])
    d = replace(d, reservations=res, stock=stock)
    assert failed(d) == {NAMES[2]}


def test_money_created_or_lost_breaks_money_conserved() -> None:
    d = consistent()
    m = d.money
    d = replace(d, money=Money(m.opening_total_cents, m.balances_total_cents + 5,
                               m.merchant_takings_cents))
    assert failed(d) == {NAMES[3]}
    assert "off by 5" in audit(d)[3].problems[0]


def test_takings_that_disagree_with_the_ledger_break_money_conserved() -> None:
    d = consistent()
    m = d.money
    d = replace(d, money=Money(m.opening_total_cents, m.balances_total_cents - 10,
                               m.merchant_takings_cents + 10))
    assert failed(d) == {NAMES[3]}
    assert "ledger net 240 != takings 250" in audit(d)[3].problems[0]


def test_stock_created_or_lost_breaks_stock_conserved() -> None:
    d = consistent()
    d = replace(d, stock=(Stock("sku-apple", 100, 97, 2), *d.stock[1:]))
    assert failed(d) == {NAMES[4]}
    assert "sku-apple" in audit(d)[4].problems[0]


def test_reserved_stock_that_disagrees_with_the_reservations_breaks_stock_conserved() -> None:
    d = consistent()
    d = replace(d, stock=(Stock("sku-apple", 100, 97, 3), *d.stock[1:]))
    assert failed(d) == {NAMES[4]}


def test_a_replay_that_differs_breaks_the_read_model_invariant() -> None:
    d = replace(consistent(), replay_equal=False, replay_detail="order o-1: state differs")
    assert failed(d) == {NAMES[5]}
    assert audit(d)[5].problems == ("order o-1: state differs",)


def test_many_problems_are_summarised() -> None:
    d = consistent()
    pending = tuple(Order(f"p-{i}", "PENDING", 1, ()) for i in range(12))
    inv = audit(replace(d, orders=d.orders + pending))[0]
    assert len(inv.problems) == 6 and inv.problems[-1] == "... and 7 more"


def test_direct_calls_to_participants_are_orphans_not_violations() -> None:
    d = consistent()
    m = d.money
    d = replace(d, ledger=(*d.ledger, LedgerEntry("direct-1", "CHARGE", 100),
                           LedgerEntry("direct-1", "REFUND", 100),
                           LedgerEntry("direct-2", "REFUND", 0)),
                money=Money(m.opening_total_cents, m.balances_total_cents,
                            m.merchant_takings_cents))
    assert failed(d) == set()
    assert orphans(d) == {"orders": 2, "net_charge_cents": 0, "reserved": 0}
