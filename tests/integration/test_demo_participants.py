"""The saga participants as processes (no sidecar): ``python -m demo_services.payment serve``
and ``python -m demo_services.inventory serve`` over h2c, two replicas sharing one SQLite file,
business answers as gRPC statuses, and sickness set through the control endpoint."""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inventory import inventory_pb2, inventory_pb2_grpc
from protos.payment import payment_pb2, payment_pb2_grpc
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

Start = Callable[[str, str, Path], procs.Proc]
REPO_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Start]:
    """Factory: ``replica("payment", "pay-1", db_path) -> Proc`` (ready); stopped at teardown."""
    started: list[procs.Proc] = []

    def _start(service: str, instance: str, db_path: Path) -> procs.Proc:
        proc = procs.start([sys.executable, "-m", f"demo_services.{service}", "serve",
                            "--instance", instance, "--db", str(db_path),
                            "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"],
                           env=REPO_ENV, cwd=REPO_ROOT, log_dir=tmp_path)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        assert proc.stop() == 0, proc.log_tail()


def _control(proc: procs.Proc, method: str, path: str, doc: Any = None) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(f"http://{proc.ready['control']}{path}", data=data,
                                 method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _code(fn: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def test_payment_replicas_charge_once_and_sickness_fails_calls_until_healed(
        replica: Start, grpc_channel, tmp_path: Path) -> None:
    db_path = tmp_path / "payment.db"
    started: dict[int, procs.Proc] = {}

    def start(i: int) -> None:
        started[i] = replica("payment", f"pay-{i + 1}", db_path)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]  # start at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a, b = started[0], started[1]
    assert a.ready["service"] == "payment" and b.ready["instance"] == "pay-2"
    pay_a = payment_pb2_grpc.PaymentStub(grpc_channel(a.ready["address"]))
    pay_b = payment_pb2_grpc.PaymentStub(grpc_channel(b.ready["address"]))
    health = health_pb2_grpc.HealthStub(grpc_channel(a.ready["address"]))
    ok = health.Check(health_pb2.HealthCheckRequest(service="payment.Payment"), timeout=5)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING

    before = pay_a.GetBalance(payment_pb2.GetBalanceRequest(customer="cust-01"), timeout=5)
    req = payment_pb2.ChargeRequest(order_id="o-1", customer="cust-01", amount_cents=1_234)
    first = pay_a.Charge(req, timeout=5)
    second = pay_b.Charge(req, timeout=5)  # the same Charge sent twice, to the other replica
    assert (first.charged, first.replayed, second.charged, second.replayed) == \
        (True, False, True, True)
    after = pay_b.GetBalance(payment_pb2.GetBalanceRequest(customer="cust-01"), timeout=5)
    assert before.balance_cents - after.balance_cents == 1_234
    entries = pay_a.ListLedger(payment_pb2.ListLedgerRequest(order_id="o-1"), timeout=5).entries
    assert [(e.kind, e.amount_cents) for e in entries] == [("CHARGE", 1_234)]
    summary = pay_b.Summary(payment_pb2.SummaryRequest(), timeout=5)
    assert summary.customers == 20  # seeded once though both replicas started together
    assert summary.balances_total_cents + summary.merchant_takings_cents == \
        summary.opening_total_cents

    # business answers and bad arguments as statuses
    assert _code(lambda: pay_a.Charge(payment_pb2.ChargeRequest(
        order_id="o-2", customer="cust-broke", amount_cents=1), timeout=5)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert pay_a.Refund(payment_pb2.RefundRequest(order_id="o-3"), timeout=5).refunded is False
    assert _code(lambda: pay_b.Charge(payment_pb2.ChargeRequest(
        order_id="o-3", customer="cust-01", amount_cents=1), timeout=5)) == \
        grpc.StatusCode.ABORTED
    assert _code(lambda: pay_a.Charge(payment_pb2.ChargeRequest(
        order_id="o-4", customer="cust-01", amount_cents=0), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT

    # sickness: every call of replica a fails with the chosen code; health is exempt
    doc = _control(a, "POST", "/sickness", {"error_rate": 1, "error_code": "RESOURCE_EXHAUSTED"})
    assert doc["error_rate"] == 1.0
    assert _code(lambda: pay_a.Charge(req, timeout=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pay_b.Charge(req, timeout=5).replayed  # the other replica is well
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert _control(a, "GET", "/sickness")["injected"] >= 1
    _control(a, "DELETE", "/sickness")
    assert pay_a.Charge(req, timeout=5).replayed
    assert pay_a.GetBalance(payment_pb2.GetBalanceRequest(customer="cust-01"),
                            timeout=5).balance_cents == after.balance_cents


def test_inventory_replica_reserves_all_or_nothing_and_refuses_a_late_reserve(
        replica: Start, grpc_channel, tmp_path: Path) -> None:
    proc = replica("inventory", "inv-1", tmp_path / "inventory.db")
    inv = inventory_pb2_grpc.InventoryStub(grpc_channel(proc.ready["address"]))
    item = inventory_pb2.Item
    req = inventory_pb2.ReserveRequest(order_id="o-1", items=[item(sku="sku-saffron",
                                                                   quantity=4)])
    assert inv.Reserve(req, timeout=5).replayed is False
    assert inv.Reserve(req, timeout=5).replayed is True
    stock = inv.GetStock(inventory_pb2.GetStockRequest(sku="sku-saffron"), timeout=5).stock
    assert (stock.available, stock.reserved, stock.opening) == (6, 4, 10)

    too_many = inventory_pb2.ReserveRequest(order_id="o-2", items=[
        item(sku="sku-apple", quantity=1), item(sku="sku-saffron", quantity=7)])
    with pytest.raises(grpc.RpcError) as info:
        inv.Reserve(too_many, timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "out of stock: sku-saffron (want 7, have 6)"

    assert inv.Release(inventory_pb2.ReleaseRequest(order_id="o-9"), timeout=5).released is False
    assert _code(lambda: inv.Reserve(inventory_pb2.ReserveRequest(
        order_id="o-9", items=[item(sku="sku-apple", quantity=1)]), timeout=5)) == \
        grpc.StatusCode.ABORTED
    assert _code(lambda: inv.Reserve(inventory_pb2.ReserveRequest(order_id="o-10"),
                                     timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: inv.GetStock(inventory_pb2.GetStockRequest(sku="sku-caviar"),
                                      timeout=5)) == grpc.StatusCode.NOT_FOUND

    assert inv.Release(inventory_pb2.ReleaseRequest(order_id="o-1"), timeout=5).released
    rows = inv.ListReservations(inventory_pb2.ListReservationsRequest(), timeout=5).reservations
    assert [(r.order_id, r.sku, r.quantity, r.state) for r in rows] == \
        [("o-1", "sku-saffron", 4, "RELEASED")]
    levels = inv.Summary(inventory_pb2.SummaryRequest(), timeout=5).stock
    assert all(s.available + s.reserved == s.opening and s.reserved == 0 for s in levels)
