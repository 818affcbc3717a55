"""The saga participants' business logic (payment's Ledger, inventory's StockBook) over real
SQLite files, no sockets: idempotency by (order id, step), cancel-before-try, recorded
refusals, replicas sharing one file, and conservation of money and stock."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demo_services.common import catalog
from demo_services.common.errors import BusinessError
from demo_services.inventory.stock import (
    RELEASED,
    RESERVED,
    ReleaseResult,
    ReserveResult,
    StockBook,
)
from demo_services.payment.ledger import CHARGE, REFUND, ChargeResult, Ledger, RefundResult

FAST = settings(deadline=None, max_examples=40)
OPENING_TOTAL = sum(c.opening_balance_cents for c in catalog.CUSTOMERS)
OPENING = {s.sku: s.opening_stock for s in catalog.SKUS}
Code = grpc.StatusCode


def _raises(code: grpc.StatusCode, fn: Callable[[], Any]) -> BusinessError:
    with pytest.raises(BusinessError) as info:
        fn()
    assert info.value.code == code, repr(info.value)
    return info.value


def _in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released together; their results or exceptions."""
    results: list[Any] = [None] * n
    gate = threading.Barrier(n)

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "payment.db")
    led.init()
    return led


@pytest.fixture
def book(tmp_path: Path) -> StockBook:
    b = StockBook(tmp_path / "inventory.db")
    b.init()
    return b


# ---------------------------------------------------------------------------- payment: setup
def test_init_seeds_opening_balances_once_and_records_the_opening_total(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "payment.db"
    Ledger(path).init()
    led = Ledger(path)
    led.charge("o-1", "cust-01", 100)
    led.init()  # a restart: nothing is seeded again, nothing is reset
    assert led.summary() == (OPENING_TOTAL, OPENING_TOTAL - 100, 100, len(catalog.CUSTOMERS))
    assert led.balance("cust-thrifty") == 5_000
    assert led.balance("cust-01") == 10_000_000 - 100


def test_replicas_starting_at_once_seed_the_ledger_once(tmp_path: Path) -> None:
    path = tmp_path / "payment.db"
    results = _in_threads(8, lambda i: Ledger(path).init())
    assert results == [None] * 8
    s = Ledger(path).summary()
    assert s.customers == len(catalog.CUSTOMERS)
    assert s.opening_total_cents == s.balances_total_cents == OPENING_TOTAL


_INIT_IN_A_PROCESS = """
import sys
from demo_services.payment.ledger import Ledger
from demo_services.inventory.stock import StockBook
print("imported", flush=True)
sys.stdin.readline()  # released together with the other children
Ledger(sys.argv[1]).init()
StockBook(sys.argv[2]).init()
"""


def test_replica_processes_initialising_a_fresh_file_at_once_all_succeed(
        tmp_path: Path) -> None:
    # SQLite refuses a concurrent switch of a fresh file to WAL at once ("database is locked",
    # busy timeout not honoured); init retries it, so every replica starts.
    repo = Path(__file__).resolve().parents[2]
    for round_ in range(4):
        pay, inv = tmp_path / f"payment-{round_}.db", tmp_path / f"inventory-{round_}.db"
        children = [subprocess.Popen([sys.executable, "-c", _INIT_IN_A_PROCESS, str(pay),
                                      str(inv)], cwd=repo, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    for _ in range(4)]
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == b"imported\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in children:
            _, err = child.communicate(timeout=60)
            assert child.returncode == 0, err.decode(errors="replace")
        assert Ledger(pay).summary().customers == len(catalog.CUSTOMERS)
        assert Ledger(pay).summary().balances_total_cents == OPENING_TOTAL
        assert _levels(StockBook(inv)) == {sku: (n, 0) for sku, n in OPENING.items()}


# ---------------------------------------------------------------------------- payment: charge
def test_charge_moves_money_from_customer_to_takings_with_a_ledger_row(ledger: Ledger) -> None:
    r = ledger.charge("o-1", "cust-01", 1_250)
    assert r == ChargeResult("o-1", charged=True, amount_cents=1_250, replayed=False)
    assert ledger.balance("cust-01") == 10_000_000 - 1_250
    assert ledger.summary().merchant_takings_cents == 1_250
    [entry] = ledger.ledger(order_id="o-1")
    assert (entry.order_id, entry.customer, entry.kind, entry.amount_cents) == \
        ("o-1", "cust-01", CHARGE, 1_250)


def test_repeated_charge_returns_the_first_answer_and_moves_money_once(ledger: Ledger) -> None:
    first = ledger.charge("o-1", "cust-01", 500)
    again = ledger.charge("o-1", "cust-01", 500)
    other = ledger.charge("o-1", "cust-02", 9_999)  # the first call's answer stands
    assert again == other == ChargeResult("o-1", True, 500, replayed=True)
    assert not first.replayed
    assert ledger.balance("cust-01") == 10_000_000 - 500
    assert ledger.balance("cust-02") == 10_000_000
    assert len(ledger.ledger(order_id="o-1")) == 1


def test_declined_charge_is_recorded_and_replayed_even_when_it_would_now_pass(
        ledger: Ledger) -> None:
    err = _raises(Code.FAILED_PRECONDITION, lambda: ledger.charge("o-1", "cust-thrifty", 6_000))
    assert err.message.startswith("insufficient funds: ")
    again = _raises(Code.FAILED_PRECONDITION, lambda: ledger.charge("o-1", "cust-thrifty", 10))
    assert again.message == err.message
    assert ledger.balance("cust-thrifty") == 5_000
    assert ledger.ledger() == []
    _raises(Code.FAILED_PRECONDITION, lambda: ledger.charge("o-2", "cust-broke", 1))


def test_charge_of_an_unknown_customer_is_a_recorded_business_answer(ledger: Ledger) -> None:
    err = _raises(Code.FAILED_PRECONDITION, lambda: ledger.charge("o-1", "cust-nobody", 100))
    assert err.message == "unknown customer cust-nobody"
    assert ledger.refund("o-1") == RefundResult("o-1", refunded=False, amount_cents=0,
                                                replayed=False)
    assert ledger.summary().balances_total_cents == OPENING_TOTAL


@pytest.mark.parametrize("order_id, customer, amount", [
    ("o-1", "cust-01", 0), ("o-1", "cust-01", -5), ("", "cust-01", 100), ("o-1", "", 100)])
def test_bad_charge_arguments_are_invalid_argument_and_not_recorded(
        ledger: Ledger, order_id: str, customer: str, amount: int) -> None:
    _raises(Code.INVALID_ARGUMENT, lambda: ledger.charge(order_id, customer, amount))
    assert ledger.charge("o-1", "cust-01", 100).replayed is False


# ---------------------------------------------------------------------------- payment: refund
def test_refund_after_charge_gives_the_money_back_once(ledger: Ledger) -> None:
    ledger.charge("o-1", "cust-03", 700)
    assert ledger.refund("o-1") == RefundResult("o-1", True, 700, replayed=False)
    assert ledger.refund("o-1") == RefundResult("o-1", True, 700, replayed=True)
    assert ledger.balance("cust-03") == 10_000_000
    assert [e.kind for e in ledger.ledger(order_id="o-1")] == [CHARGE, REFUND]
    assert ledger.summary() == (OPENING_TOTAL, OPENING_TOTAL, 0, len(catalog.CUSTOMERS))
    # a charge repeated after the refund replays the first answer; it does not charge again
    assert ledger.charge("o-1", "cust-03", 700).replayed
    assert ledger.balance("cust-03") == 10_000_000


def test_refund_before_charge_is_recorded_and_the_late_charge_is_aborted(
        ledger: Ledger) -> None:
    assert ledger.refund("o-1") == RefundResult("o-1", False, 0, replayed=False)
    err = _raises(Code.ABORTED, lambda: ledger.charge("o-1", "cust-01", 300))
    assert err.message == "order o-1 was refunded before it was charged"
    _raises(Code.ABORTED, lambda: ledger.charge("o-1", "cust-01", 300))  # recorded: replayed
    assert ledger.refund("o-1") == RefundResult("o-1", False, 0, replayed=True)
    assert ledger.balance("cust-01") == 10_000_000
    assert ledger.ledger(order_id="o-1") == []


def test_refund_after_a_declined_charge_moves_nothing(ledger: Ledger) -> None:
    _raises(Code.FAILED_PRECONDITION, lambda: ledger.charge("o-1", "cust-broke", 100))
    assert ledger.refund("o-1") == RefundResult("o-1", False, 0, replayed=False)
    assert ledger.summary().merchant_takings_cents == 0


def test_bad_refund_argument_is_invalid_argument(ledger: Ledger) -> None:
    _raises(Code.INVALID_ARGUMENT, lambda: ledger.refund(""))


# ---------------------------------------------------------------------------- payment: reads
def test_ledger_filters_by_order_and_customer(ledger: Ledger) -> None:
    ledger.charge("o-1", "cust-01", 100)
    ledger.charge("o-2", "cust-02", 200)
    ledger.charge("o-3", "cust-01", 300)
    ledger.refund("o-3")
    assert [e.order_id for e in ledger.ledger(customer="cust-01")] == ["o-1", "o-3", "o-3"]
    assert [e.kind for e in ledger.ledger(order_id="o-3", customer="cust-01")] == \
        [CHARGE, REFUND]
    assert ledger.ledger(order_id="o-2", customer="cust-01") == []
    assert len(ledger.ledger()) == 4
    ids = [e.id for e in ledger.ledger()]
    assert ids == sorted(ids)


def test_balance_of_an_unknown_customer_is_not_found(ledger: Ledger) -> None:
    _raises(Code.NOT_FOUND, lambda: ledger.balance("cust-nobody"))


# ---------------------------------------------------------------------------- payment: replicas
def test_two_ledgers_on_one_file_see_one_truth(tmp_path: Path) -> None:
    a, b = Ledger(tmp_path / "payment.db"), Ledger(tmp_path / "payment.db")
    a.init()
    b.init()
    assert not a.charge("o-1", "cust-05", 400).replayed
    assert b.charge("o-1", "cust-05", 400).replayed
    assert b.balance("cust-05") == 10_000_000 - 400
    assert b.refund("o-2") == RefundResult("o-2", False, 0, False)
    _raises(Code.ABORTED, lambda: a.charge("o-2", "cust-05", 1))
    assert a.refund("o-1").refunded and b.refund("o-1").replayed
    assert a.balance("cust-05") == 10_000_000


def test_the_same_charge_racing_on_two_replicas_charges_once(tmp_path: Path) -> None:
    path = tmp_path / "payment.db"
    Ledger(path).init()
    replicas = [Ledger(path), Ledger(path)]
    results = _in_threads(8, lambda i: replicas[i % 2].charge("o-1", "cust-07", 900))
    assert all(isinstance(r, ChargeResult) for r in results), results
    assert sorted(r.replayed for r in results) == [False] + [True] * 7
    assert Ledger(path).balance("cust-07") == 10_000_000 - 900


# ---------------------------------------------------------------------------- inventory
def _levels(book: StockBook) -> dict[str, tuple[int, int]]:
    return {s.sku: (s.available, s.reserved) for s in book.summary()}


def test_init_seeds_stock_and_prices_once(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    assert _in_threads(6, lambda i: StockBook(path).init()) == [None] * 6
    book = StockBook(path)
    book.reserve("o-1", [("sku-apple", 3)])
    book.init()
    assert {s.sku: (s.opening, s.price_cents) for s in book.summary()} == \
        {s.sku: (s.opening_stock, s.price_cents) for s in catalog.SKUS}
    assert book.stock("sku-apple").available == OPENING["sku-apple"] - 3


def test_reserve_takes_every_item_with_a_reservation_row_each(book: StockBook) -> None:
    r = book.reserve("o-1", [("sku-truffle", 2), ("sku-apple", 5), ("sku-truffle", 1)])
    assert r == ReserveResult("o-1", reserved=True, replayed=False)
    assert book.stock("sku-truffle").available == 37
    assert book.stock("sku-truffle").reserved == 3
    assert [(x.sku, x.quantity, x.state) for x in book.reservations("o-1")] == \
        [("sku-apple", 5, RESERVED), ("sku-truffle", 3, RESERVED)]


def test_repeated_reserve_returns_the_first_answer_and_reserves_once(book: StockBook) -> None:
    book.reserve("o-1", [("sku-saffron", 4)])
    assert book.reserve("o-1", [("sku-saffron", 4)]) == ReserveResult("o-1", True, True)
    assert book.reserve("o-1", [("sku-apple", 1)]).replayed  # the first call's answer stands
    assert book.stock("sku-saffron").available == 6
    assert book.stock("sku-apple").reserved == 0
    assert len(book.reservations("o-1")) == 1


def test_out_of_stock_is_all_or_nothing_recorded_and_replayed(book: StockBook) -> None:
    book.reserve("o-1", [("sku-saffron", 8)])
    err = _raises(Code.FAILED_PRECONDITION,
                  lambda: book.reserve("o-2", [("sku-apple", 1), ("sku-saffron", 3)]))
    assert err.message == "out of stock: sku-saffron (want 3, have 2)"
    assert book.stock("sku-apple").reserved == 0  # nothing of the order was taken
    book.release("o-1")  # stock is back, but the recorded answer stands
    again = _raises(Code.FAILED_PRECONDITION, lambda: book.reserve("o-2", [("sku-saffron", 3)]))
    assert again.message == err.message
    assert book.reservations("o-2") == []
    assert book.release("o-2") == ReleaseResult("o-2", released=False, replayed=False)


def test_an_unknown_sku_is_a_recorded_business_answer(book: StockBook) -> None:
    err = _raises(Code.FAILED_PRECONDITION, lambda: book.reserve("o-1", [("sku-caviar", 1)]))
    assert "sku-caviar" in err.message
    _raises(Code.FAILED_PRECONDITION, lambda: book.reserve("o-1", [("sku-apple", 1)]))
    _raises(Code.NOT_FOUND, lambda: book.stock("sku-caviar"))


@pytest.mark.parametrize("order_id, items", [
    ("o-1", []), ("o-1", [("sku-apple", 0)]), ("o-1", [("sku-apple", 2), ("sku-bread", -1)]),
    ("o-1", [("", 1)]), ("", [("sku-apple", 1)])])
def test_bad_reserve_arguments_are_invalid_argument_and_not_recorded(
        book: StockBook, order_id: str, items: list[tuple[str, int]]) -> None:
    _raises(Code.INVALID_ARGUMENT, lambda: book.reserve(order_id, items))
    assert book.reserve("o-1", [("sku-apple", 1)]).replayed is False


def test_release_gives_back_what_was_reserved_once(book: StockBook) -> None:
    before = _levels(book)
    book.reserve("o-1", [("sku-cheese", 4), ("sku-coffee", 2)])
    assert book.release("o-1") == ReleaseResult("o-1", released=True, replayed=False)
    assert book.release("o-1") == ReleaseResult("o-1", released=True, replayed=True)
    assert _levels(book) == before
    assert {x.state for x in book.reservations("o-1")} == {RELEASED}
    assert book.reserve("o-1", [("sku-cheese", 4)]).replayed  # no second reservation
    assert _levels(book) == before


def test_release_before_reserve_is_recorded_and_the_late_reserve_is_aborted(
        book: StockBook) -> None:
    before = _levels(book)
    assert book.release("o-1") == ReleaseResult("o-1", released=False, replayed=False)
    err = _raises(Code.ABORTED, lambda: book.reserve("o-1", [("sku-apple", 1)]))
    assert err.message == "order o-1 was released before it was reserved"
    _raises(Code.ABORTED, lambda: book.reserve("o-1", [("sku-apple", 1)]))
    assert book.release("o-1").replayed
    assert _levels(book) == before and book.reservations("o-1") == []


def test_two_stock_books_on_one_file_share_the_last_units(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    StockBook(path).init()
    replicas = [StockBook(path), StockBook(path)]
    results = _in_threads(14, lambda i: replicas[i % 2].reserve(f"o-{i}", [("sku-saffron", 1)]))
    won = [r for r in results if isinstance(r, ReserveResult)]
    lost = [r for r in results if isinstance(r, BusinessError)]
    assert len(won) == 10 and len(lost) == 4, results
    assert all(e.code == Code.FAILED_PRECONDITION for e in lost)
    assert replicas[1].stock("sku-saffron") == replicas[0].stock("sku-saffron")
    assert (replicas[0].stock("sku-saffron").available,
            replicas[0].stock("sku-saffron").reserved) == (0, 10)


# ---------------------------------------------------------------------------- properties
# Random sequences of calls, with duplicates and any ordering, sent to two replicas of one file,
# against a reference model of the contract: every answer matches the model and the
# invariants hold at the end.
ORDER_IDS = [f"o-{i}" for i in range(5)]

payment_ops = st.lists(st.one_of(
    st.tuples(st.just("charge"), st.sampled_from(ORDER_IDS),
              st.sampled_from(["cust-01", "cust-thrifty", "cust-broke", "cust-nobody"]),
              st.integers(1, 4_000), st.integers(0, 1)),
    st.tuples(st.just("refund"), st.sampled_from(ORDER_IDS), st.just(""), st.just(0),
              st.integers(0, 1)),
), max_size=25)


@FAST
@given(ops=payment_ops)
def test_any_charges_and_refunds_conserve_money_and_charge_each_order_at_most_once(
        ops: list[tuple[str, str, str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payment.db"
        replicas = [Ledger(path), Ledger(path)]
        for r in replicas:
            r.init()
        balance = {c.name: c.opening_balance_cents for c in catalog.CUSTOMERS}
        charges: dict[str, tuple[grpc.StatusCode | None, str, int]] = {}  # first answers
        refunds: dict[str, int] = {}  # order -> amount given back (0: nothing was charged)
        for kind, order_id, customer, amount, replica in ops:
            led = replicas[replica]
            if kind == "charge":
                if order_id not in charges:  # the model decides the first answer
                    if order_id in refunds:
                        charges[order_id] = (Code.ABORTED, customer, amount)
                    elif balance.get(customer, -1) < amount:
                        charges[order_id] = (Code.FAILED_PRECONDITION, customer, amount)
                    else:
                        balance[customer] -= amount
                        charges[order_id] = (None, customer, amount)
                    replayed = False
                else:
                    replayed = True
                code, _, first_amount = charges[order_id]
                if code is None:
                    assert led.charge(order_id, customer, amount) == ChargeResult(
                        order_id, True, first_amount, replayed)
                else:
                    _raises(code, lambda: led.charge(order_id, customer, amount))  # noqa: B023
            else:
                replayed = order_id in refunds
                if not replayed:
                    code, who, first_amount = charges.get(order_id, (Code.ABORTED, "", 0))
                    refunds[order_id] = first_amount if code is None else 0
                    if code is None:
                        balance[who] += first_amount
                back = refunds[order_id]
                assert led.refund(order_id) == RefundResult(order_id, back > 0, back, replayed)

        s = replicas[0].summary()
        assert s.balances_total_cents + s.merchant_takings_cents == s.opening_total_cents
        assert s.opening_total_cents == OPENING_TOTAL
        assert {c: replicas[1].balance(c) for c in balance} == balance
        for order_id in ORDER_IDS:
            entries = replicas[1].ledger(order_id=order_id)
            assert [e.kind for e in entries] in ([], [CHARGE], [CHARGE, REFUND])
            net = sum(e.amount_cents if e.kind == CHARGE else -e.amount_cents for e in entries)
            code, _, first_amount = charges.get(order_id, (Code.ABORTED, "", 0))
            assert net == (0 if code is not None or order_id in refunds else first_amount)


SKU_CHOICES = ["sku-saffron", "sku-truffle", "sku-apple", "sku-caviar"]
inventory_ops = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.sampled_from(ORDER_IDS),
              st.lists(st.tuples(st.sampled_from(SKU_CHOICES), st.integers(1, 6)),
                       min_size=1, max_size=3),
              st.integers(0, 1)),
    st.tuples(st.just("release"), st.sampled_from(ORDER_IDS), st.just([]), st.integers(0, 1)),
), max_size=25)


@FAST
@given(ops=inventory_ops)
def test_any_reserves_and_releases_conserve_stock_and_reserve_each_order_at_most_once(
        ops: list[tuple[str, str, list[tuple[str, int]], int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inventory.db"
        replicas = [StockBook(path), StockBook(path)]
        for r in replicas:
            r.init()
        available = dict(OPENING)
        reserves: dict[str, tuple[grpc.StatusCode | None, dict[str, int]]] = {}  # first answers
        releases: dict[str, bool] = {}  # order -> released something
        for kind, order_id, items, replica in ops:
            book = replicas[replica]
            if kind == "reserve":
                replayed = order_id in reserves
                if not replayed:
                    want: dict[str, int] = {}
                    for sku, qty in items:
                        want[sku] = want.get(sku, 0) + qty
                    if order_id in releases:
                        reserves[order_id] = (Code.ABORTED, {})
                    elif any(available.get(sku, -1) < qty for sku, qty in want.items()):
                        reserves[order_id] = (Code.FAILED_PRECONDITION, {})
                    else:
                        for sku, qty in want.items():
                            available[sku] -= qty
                        reserves[order_id] = (None, want)
                code, _ = reserves[order_id]
                if code is None:
                    assert book.reserve(order_id, items) == ReserveResult(order_id, True,
                                                                          replayed)
                else:
                    _raises(code, lambda: book.reserve(order_id, items))  # noqa: B023
            else:
                replayed = order_id in releases
                if not replayed:
                    code, took = reserves.get(order_id, (Code.ABORTED, {}))
                    releases[order_id] = code is None
                    for sku, qty in took.items():
                        available[sku] += qty
                assert book.release(order_id) == ReleaseResult(order_id, releases[order_id],
                                                               replayed)

        held: dict[str, int] = {}
        for order_id in ORDER_IDS:
            rows = replicas[1].reservations(order_id)
            code, took = reserves.get(order_id, (Code.ABORTED, {}))
            assert {x.sku: x.quantity for x in rows} == took
            assert {x.state for x in rows} <= {RELEASED if order_id in releases else RESERVED}
            for x in rows:
                if x.state == RESERVED:
                    held[x.sku] = held.get(x.sku, 0) + x.quantity
        for s in replicas[0].summary():
            assert s.available == available[s.sku] >= 0
            assert s.available + s.reserved == s.opening == OPENING[s.sku]
            assert s.reserved == held.get(s.sku, 0)
