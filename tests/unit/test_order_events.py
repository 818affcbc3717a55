"""Order's event sourcing and its service logic, in-process: the projector, the read model
against a replay (and the ``rebuild`` command), CreateOrder's idempotency by request id (one
replica and two racing), validation, ListOrders paging and filtering, WatchOrder, and the gRPC
servicer's statuses. Inventory and payment are in-memory fakes."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from itertools import count
from pathlib import Path

import grpc
import pytest

from demo_services.common import db as dbm
from demo_services.common.errors import BusinessError
from demo_services.order import __main__ as order_cli
from demo_services.order import events as ev
from demo_services.order.events import Event, EventType, OrderView, ProjectionError, apply
from demo_services.order.runner import SagaManager, SagaRunner
from demo_services.order.service import (
    ChangeFeed,
    OrderService,
    OrderServicer,
    decode_page_token,
    encode_page_token,
    wait_budget_s,
)
from demo_services.order.store import OrderStore
from protos.order import order_pb2, order_pb2_grpc

T0 = 1_700_000_000.0


# --------------------------------------------------------------------------- fakes


class FakeParticipants:
    """In-memory, idempotent stand-ins for inventory and payment (a fake: no sockets, no
    files). ``broke`` customers are declined; ``stock`` caps units per SKU; while ``gate`` is
    clear, Reserve blocks (to hold a saga in flight)."""

    def __init__(self, broke: Sequence[str] = ("cust-broke",),
                 stock: dict[str, int] | None = None,
                 gate: threading.Event | None = None) -> None:
        self.broke = set(broke)
        self.stock = dict(stock or {})
        self.gate = gate
        self.lock = threading.Lock()
        self.reserved: dict[str, list[tuple[str, int]]] = {}
        self.released: set[str] = set()
        self.charged: dict[str, int] = {}
        self.refunded: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def reserve(self, order_id: str, items: Sequence[tuple[str, int]]) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.calls.append(("reserve", order_id))
            if order_id in self.released:
                raise BusinessError(grpc.StatusCode.ABORTED, "released before reserved")
            if order_id in self.reserved:
                return
            for sku, qty in items:
                if sku in self.stock and self.stock[sku] < qty:
                    raise BusinessError(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"out of stock: {sku}")
            for sku, qty in items:
                if sku in self.stock:
                    self.stock[sku] -= qty
            self.reserved[order_id] = list(items)

    def release(self, order_id: str) -> bool:
        with self.lock:
            self.calls.append(("release", order_id))
            first = order_id not in self.released
            self.released.add(order_id)
            had = order_id in self.reserved
            if had and first:
                for sku, qty in self.reserved[order_id]:
                    if sku in self.stock:
                        self.stock[sku] += qty
            return had

    def charge(self, order_id: str, customer: str, amount_cents: int) -> int:
        with self.lock:
            self.calls.append(("charge", order_id))
            if order_id in self.refunded:
                raise BusinessError(grpc.StatusCode.ABORTED, "refunded before charged")
            if customer in self.broke:
                raise BusinessError(grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds")
            self.charged.setdefault(order_id, amount_cents)
            return self.charged[order_id]

    def refund(self, order_id: str) -> int:
        with self.lock:
            self.calls.append(("refund", order_id))
            self.refunded.add(order_id)
            return self.charged.get(order_id, 0)


def make_service(db_path: Path, participants: FakeParticipants, name: str = "r1",
                 ids: Callable[[], str] | None = None) -> OrderService:
    store = OrderStore(db_path)
    store.init()
    feed = ChangeFeed()
    runner = SagaRunner(store, participants, owner=name, lease_s=5.0, on_change=feed.notify)
    manager = SagaManager(runner, workers=8)
    counter = count(1)
    return OrderService(store, manager, feed, poll_s=0.01,
                        new_order_id=ids or (lambda: f"ord-{name}-{next(counter):04d}"))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[OrderService]:
    svc = make_service(tmp_path / "order.db", FakeParticipants())
    yield svc
    svc.manager.stop(timeout_s=5)


# --------------------------------------------------------------------------- projector


def _created(order_id: str = "o1", seq: int = 1, at: float = T0) -> Event:
    return Event(seq, order_id, 1, EventType.ORDER_CREATED,
                 {"request_id": f"req-{order_id}", "customer": "cust-01",
                  "items": [["sku-apple", 2], ["sku-bread", 1]], "amount_cents": 590}, at)


def _fold(*types: tuple[EventType, dict]) -> list[OrderView]:
    view = apply(None, _created())
    views = [view]
    for i, (type_, data) in enumerate(types, start=2):
        view = apply(view, Event(i, "o1", i, type_, data, T0 + i))
        views.append(view)
    return views


def test_order_created_projects_a_pending_view_with_the_request() -> None:
    view = apply(None, _created())
    assert view == OrderView("o1", "req-o1", "cust-01", (("sku-apple", 2), ("sku-bread", 1)),
                             590, ev.PENDING, "", T0, T0, 1, 1)


def test_happy_path_events_end_confirmed_and_count_the_version() -> None:
    views = _fold((EventType.STOCK_RESERVED, {}),
                  (EventType.PAYMENT_CHARGED, {"amount_cents": 590}),
                  (EventType.ORDER_CONFIRMED, {}))
    assert [v.state for v in views] == ["PENDING", "PENDING", "PENDING", "CONFIRMED"]
    assert views[-1].version == 4 and views[-1].updated_at_unix == T0 + 4
    assert views[-1].created_at_unix == T0 and views[-1].seq == 1


def test_compensation_events_end_cancelled_with_the_reason() -> None:
    views = _fold((EventType.STOCK_RESERVED, {}),
                  (EventType.CHARGE_FAILED, {"reason": "insufficient funds",
                                             "code": "FAILED_PRECONDITION", "ambiguous": False}),
                  (EventType.STOCK_RELEASED, {"released": True}),
                  (EventType.ORDER_CANCELLED, {"reason": "insufficient funds"}))
    assert views[2].state == "PENDING" and views[2].reason == "insufficient funds"
    assert views[-1].state == "CANCELLED" and views[-1].reason == "insufficient funds"


@pytest.mark.parametrize("bad", [
    Event(2, "o1", 3, EventType.STOCK_RESERVED, {}, T0),         # skips version 2
    Event(2, "o1", 1, EventType.ORDER_CREATED, {}, T0),          # created twice
    Event(2, "o1", 2, "Bogus", {}, T0),                          # type: ignore[arg-type]
])
def test_projector_refuses_an_event_that_cannot_follow(bad: Event) -> None:
    with pytest.raises(ProjectionError):
        apply(apply(None, _created()), bad)


def test_projector_refuses_events_before_created_and_after_terminal() -> None:
    with pytest.raises(ProjectionError):
        apply(None, Event(1, "o1", 1, EventType.STOCK_RESERVED, {}, T0))
    done = _fold((EventType.RESERVE_FAILED, {"reason": "out of stock: sku-saffron"}),
                 (EventType.ORDER_CANCELLED, {"reason": "out of stock: sku-saffron"}))[-1]
    with pytest.raises(ProjectionError):
        apply(done, Event(9, "o1", done.version + 1, EventType.STOCK_RELEASED, {}, T0))


def test_replay_folds_interleaved_orders_independently() -> None:
    a, b = _created("a", 1), _created("b", 2)
    views = ev.replay([a, b, Event(3, "b", 2, EventType.STOCK_RESERVED, {}, T0 + 1),
                       Event(4, "a", 2, EventType.RESERVE_FAILED, {"reason": "x"}, T0 + 2)])
    assert views["a"].reason == "x" and views["a"].version == 2
    assert views["b"].version == 2 and views["b"].seq == 2


# --------------------------------------------------------------------------- rebuild


def _run_orders(service: OrderService, n: int) -> list[OrderView]:
    customers = ["cust-01", "cust-broke", "cust-02"]
    return [service.create(f"req-{i}", customers[i % 3], [("sku-apple", i + 1)], wait_s=5)
            for i in range(n)]


def test_read_model_equals_a_replay_of_the_events(service: OrderService) -> None:
    views = _run_orders(service, 6)
    assert {v.state for v in views} == {"CONFIRMED", "CANCELLED"}
    report = ev.rebuild_check(service.store.db_path)
    assert report.equal and report.differences == ()
    assert report.orders == 6
    # confirmed: created, reserved, charged, confirmed; cancelled: + charge failed, released
    assert report.events == sum(4 if v.state == "CONFIRMED" else 5 for v in views)


def test_a_tampered_read_model_is_reported_with_the_order_and_column(
        service: OrderService) -> None:
    views = _run_orders(service, 3)
    with dbm.tx(service.store.db_path) as db:
        db.execute("UPDATE orders SET state = 'PENDING' WHERE order_id = ?",
                   (views[0].order_id,))
        db.execute("DELETE FROM orders WHERE order_id = ?", (views[1].order_id,))
    report = ev.rebuild_check(service.store.db_path)
    assert not report.equal
    assert any(views[0].order_id in d and "state live='PENDING'" in d
               for d in report.differences)
    assert any(views[1].order_id in d and "missing from the live read model" in d
               for d in report.differences)


def test_events_are_append_only(service: OrderService) -> None:
    _run_orders(service, 1)
    for sql in ("UPDATE events SET type = 'OrderConfirmed'", "DELETE FROM events"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"), \
                dbm.tx(service.store.db_path) as db:
            db.execute(sql)


def test_rebuild_command_exits_0_when_equal_and_1_with_the_differences(
        service: OrderService, capsys: pytest.CaptureFixture[str]) -> None:
    views = _run_orders(service, 2)
    db_path = str(service.store.db_path)
    with pytest.raises(SystemExit) as exit_:
        order_cli.main(["rebuild", "--db", db_path])
    assert exit_.value.code == 0
    assert "read model equals a replay of" in capsys.readouterr().out
    with dbm.tx(db_path) as db:
        db.execute("UPDATE orders SET reason = 'edited' WHERE order_id = ?",
                   (views[0].order_id,))
    with pytest.raises(SystemExit) as exit_:
        order_cli.main(["rebuild", "--db", db_path, "--json"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert '"equal": false' in out and views[0].order_id in out


def test_rebuild_command_with_a_missing_database_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        order_cli.main(["rebuild", "--db", str(tmp_path / "nope.db")])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- CreateOrder


def test_the_same_request_id_returns_the_same_order_and_creates_one(
        service: OrderService) -> None:
    first = service.create("req-same", "cust-01", [("sku-bread", 2)], wait_s=5)
    again = service.create("req-same", "cust-01", [("sku-bread", 2)], wait_s=5)
    other_payload = service.create("req-same", "cust-02", [("sku-apple", 9)], wait_s=5)
    assert first.state == "CONFIRMED"
    assert again == first and other_payload == first
    assert len(service.store.list_orders()) == 1
    participants = service.runner.participants
    assert isinstance(participants, FakeParticipants)
    assert [c for c in participants.calls if c[0] == "charge"] == [("charge", first.order_id)]


def test_two_replicas_racing_on_one_request_id_create_one_order(tmp_path: Path) -> None:
    db_path = tmp_path / "order.db"
    fake = FakeParticipants()
    replicas = [make_service(db_path, fake, name) for name in ("r1", "r2")]
    barrier = threading.Barrier(8)

    def create(i: int) -> OrderView:
        barrier.wait()
        return replicas[i % 2].create("req-race", "cust-01", [("sku-apple", 1)], wait_s=5)

    try:
        with futures.ThreadPoolExecutor(8) as pool:
            views = list(pool.map(create, range(8)))
    finally:
        for r in replicas:
            r.manager.stop(timeout_s=5)
    assert len({v.order_id for v in views}) == 1
    assert {v.state for v in views} == {"CONFIRMED"}
    assert len(replicas[0].store.list_orders()) == 1
    assert len(fake.charged) == 1


@pytest.mark.parametrize(("request_id", "customer", "items", "message"), [
    ("", "cust-01", [("sku-apple", 1)], "request_id"),
    ("r", "", [("sku-apple", 1)], "customer"),
    ("r", "cust-01", [], "at least one item"),
    ("r", "cust-01", [("sku-nope", 1)], "unknown sku"),
    ("r", "cust-01", [("sku-apple", 0)], "quantity"),
    ("r", "cust-01", [("sku-apple", -3)], "quantity"),
    ("x" * 201, "cust-01", [("sku-apple", 1)], "request_id"),
])
def test_an_invalid_order_is_invalid_argument_and_creates_nothing(
        service: OrderService, request_id: str, customer: str,
        items: list[tuple[str, int]], message: str) -> None:
    with pytest.raises(BusinessError, match=message) as err:
        service.create(request_id, customer, items, wait_s=1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert service.store.list_orders() == []


def test_repeated_skus_are_added_up_and_the_amount_comes_from_the_catalog(
        service: OrderService) -> None:
    view = service.create("req-merge", "cust-01",
                          [("sku-apple", 1), ("sku-bread", 1), ("sku-apple", 2)], wait_s=5)
    assert view.items == (("sku-apple", 3), ("sku-bread", 1))
    assert view.amount_cents == 3 * 120 + 350


def test_create_returns_pending_when_its_wait_ends_and_the_saga_goes_on(
        tmp_path: Path) -> None:
    gate = threading.Event()
    svc = make_service(tmp_path / "order.db", FakeParticipants(gate=gate))
    try:
        pending = svc.create("req-slow", "cust-01", [("sku-apple", 1)], wait_s=0.1)
        assert pending.state == "PENDING" and pending.order_id
        gate.set()
        done = svc.wait_terminal(pending.order_id, 5)
        assert done.state == "CONFIRMED" and done.order_id == pending.order_id
    finally:
        gate.set()
        svc.manager.stop(timeout_s=5)


def test_get_of_an_unknown_order_is_not_found(service: OrderService) -> None:
    with pytest.raises(BusinessError) as err:
        service.get("ord-none")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_wait_budget_keeps_a_margin_before_the_deadline_and_caps_at_30_s() -> None:
    assert wait_budget_s(None) == 30.0
    assert wait_budget_s(9.2e18) == 30.0           # gRPC's "no deadline"
    assert wait_budget_s(2.0) == pytest.approx(1.75)
    assert wait_budget_s(0.5) == pytest.approx(0.4)
    assert wait_budget_s(0.0) == 0.0


# --------------------------------------------------------------------------- ListOrders


def test_list_orders_pages_in_creation_order_without_repeats(service: OrderService) -> None:
    created = _run_orders(service, 23)
    seen: list[str] = []
    token = ""
    sizes = []
    while True:
        page, token = service.list_orders(page_size=10, page_token=token)
        sizes.append(len(page))
        seen += [v.order_id for v in page]
        if not token:
            break
    assert sizes == [10, 10, 3]
    assert seen == [v.order_id for v in created]


def test_list_orders_filters_by_state_across_pages(service: OrderService) -> None:
    created = _run_orders(service, 12)
    cancelled = [v.order_id for v in created if v.state == "CANCELLED"]
    page1, token = service.list_orders("CANCELLED", page_size=3)
    page2, last = service.list_orders("CANCELLED", page_size=3, page_token=token)
    assert last == ""
    assert [v.order_id for v in page1 + page2] == cancelled
    assert {v.state for v in page1 + page2} == {"CANCELLED"}
    assert service.list_orders("PENDING")[0] == []


def test_list_orders_defaults_to_100_and_clamps_to_1000(service: OrderService) -> None:
    _run_orders(service, 3)
    assert len(service.list_orders(page_size=0)[0]) == 3
    assert len(service.list_orders(page_size=5000)[0]) == 3


@pytest.mark.parametrize(("state", "size", "token"), [
    ("SHIPPED", 10, ""),
    ("", -1, ""),
    ("", 10, "not-a-token"),
    ("CONFIRMED", 10, encode_page_token("CANCELLED", 4)),
])
def test_list_orders_rejects_a_bad_filter_size_or_token(
        service: OrderService, state: str, size: int, token: str) -> None:
    with pytest.raises(BusinessError) as err:
        service.list_orders(state, size, token)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_page_token_round_trips() -> None:
    assert decode_page_token(encode_page_token("CONFIRMED", 42), "CONFIRMED") == 42


# --------------------------------------------------------------------------- WatchOrder


def test_watch_streams_every_change_until_terminal(tmp_path: Path) -> None:
    gate = threading.Event()
    svc = make_service(tmp_path / "order.db", FakeParticipants(broke=["cust-01"], gate=gate))
    try:
        pending = svc.create("req-w", "cust-01", [("sku-apple", 1)], wait_s=0)
        stream = svc.watch(pending.order_id)
        first = next(stream)
        gate.set()
        rest = list(stream)
    finally:
        gate.set()
        svc.manager.stop(timeout_s=5)
    views = [first, *rest]
    assert [v.version for v in views] == list(range(1, len(views) + 1))
    assert views[-1].state == "CANCELLED" and views[-1].reason == "insufficient funds"
    assert views[-1] == svc.get(pending.order_id)


def test_watch_stops_when_the_client_goes_away(tmp_path: Path) -> None:
    gate = threading.Event()
    svc = make_service(tmp_path / "order.db", FakeParticipants(gate=gate))
    try:
        pending = svc.create("req-gone", "cust-01", [("sku-apple", 1)], wait_s=0)
        active = iter([True, True, False])
        views = list(svc.watch(pending.order_id, lambda: next(active, False)))
        assert [v.state for v in views] == ["PENDING"]
    finally:
        gate.set()
        svc.manager.stop(timeout_s=5)


# --------------------------------------------------------------------------- gRPC servicer


@pytest.fixture
def order_stub(tmp_path: Path) -> Iterator[tuple[order_pb2_grpc.OrderStub, threading.Event]]:
    gate = threading.Event()
    gate.set()
    svc = make_service(tmp_path / "order.db", FakeParticipants(gate=gate))
    server = grpc.server(futures.ThreadPoolExecutor(8))
    order_pb2_grpc.add_OrderServicer_to_server(OrderServicer(svc), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield order_pb2_grpc.OrderStub(channel), gate
    finally:
        gate.set()
        channel.close()
        server.stop(0).wait()
        svc.manager.stop(timeout_s=5)


def _req(request_id: str, customer: str = "cust-01") -> order_pb2.CreateOrderRequest:
    return order_pb2.CreateOrderRequest(request_id=request_id, customer=customer,
                                        items=[order_pb2.Item(sku="sku-coffee", quantity=2)])


def test_servicer_creates_gets_lists_and_watches(
        order_stub: tuple[order_pb2_grpc.OrderStub, threading.Event]) -> None:
    stub, _ = order_stub
    made = stub.CreateOrder(_req("req-g1"), timeout=5)
    assert made.state == "CONFIRMED" and made.amount_cents == 2500 and made.version == 4
    assert stub.CreateOrder(_req("req-g1"), timeout=5).order_id == made.order_id
    assert stub.GetOrder(order_pb2.GetOrderRequest(order_id=made.order_id), timeout=5) == made
    listed = stub.ListOrders(order_pb2.ListOrdersRequest(state="CONFIRMED"), timeout=5)
    assert [o.order_id for o in listed.orders] == [made.order_id]
    assert listed.next_page_token == ""
    watched = list(stub.WatchOrder(order_pb2.GetOrderRequest(order_id=made.order_id),
                                   timeout=5))
    assert watched == [made]


def test_servicer_answers_pending_before_the_deadline(
        order_stub: tuple[order_pb2_grpc.OrderStub, threading.Event]) -> None:
    stub, gate = order_stub
    gate.clear()
    made = stub.CreateOrder(_req("req-late"), timeout=0.5)
    assert made.state == "PENDING" and made.order_id
    gate.set()
    watched = list(stub.WatchOrder(order_pb2.GetOrderRequest(order_id=made.order_id),
                                   timeout=5))
    assert watched[-1].state == "CONFIRMED"
    assert [w.version for w in watched] == list(range(watched[0].version,
                                                      watched[-1].version + 1))


@pytest.mark.parametrize(("call", "code"), [
    (lambda s: s.CreateOrder(_req(""), timeout=5), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.GetOrder(order_pb2.GetOrderRequest(order_id="x"), timeout=5),
     grpc.StatusCode.NOT_FOUND),
    (lambda s: list(s.WatchOrder(order_pb2.GetOrderRequest(order_id="x"), timeout=5)),
     grpc.StatusCode.NOT_FOUND),
    (lambda s: s.ListOrders(order_pb2.ListOrdersRequest(page_token="zz"), timeout=5),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_servicer_maps_errors_to_statuses(
        order_stub: tuple[order_pb2_grpc.OrderStub, threading.Event],
        call: Callable[[order_pb2_grpc.OrderStub], object], code: grpc.StatusCode) -> None:
    stub, _ = order_stub
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() == code
