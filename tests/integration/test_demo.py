"""The demo end to end, as a user runs it: ``python -m demo_services.demo up`` (on free ports
in a tmp dir, by environment), the saga's paths through real sidecars (the test's way in is
the load generator's outbound-only sidecar for ``order``, an order replica's sidecar for
``payment`` and ``inventory``, as the demo's authorization allows), an order
replica SIGKILLed mid-saga, ``python -m demo_services.check``, a second ``up`` and ``down``
twice. One demo is shared by the module; the tests run in file order and each says what it
leaves behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import stat
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from demo_services.launcher.procs import is_ours
from demo_services.launcher.state import load as load_state
from protos.inventory import inventory_pb2
from protos.order import order_pb2
from protos.payment import payment_pb2
from tests.support import procs
from tests.support.demo import Demo, demo_env, running_demo

pytestmark = pytest.mark.timeout(180)

LEASE_S = 1.5
RPS = 8
SICK_LATENCY_MS = 1200
EXPECTED = {("control-plane", ""): 1, ("loadgen", "loadgen"): 1, ("sidecar", "loadgen"): 1,
            ("gateway", "gateway"): 1, ("sidecar", "gateway"): 1,
            **{(role, svc): 2 for role in ("app", "sidecar")
               for svc in ("inventory", "payment", "order")}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    base = tmp_path_factory.mktemp("demo")
    with running_demo(base, demo_env(base, rps=RPS, lease_s=LEASE_S)) as d:
        yield d


@contextmanager
def load_paused(demo: Demo) -> Iterator[None]:
    """The load generator paused and every order terminal while the block runs."""
    lg = demo.state.one("loadgen")
    demo.control(lg, "POST", "/pause", {})
    try:
        procs.wait_for(lambda: demo.control(lg, "GET", "/stats")["in_flight"] == 0, 15,
                       what="the load generator's calls to finish")
        procs.wait_for(lambda: not demo.order().ListOrders(
            order_pb2.ListOrdersRequest(state="PENDING"), timeout=5).orders, 15,
            what="no PENDING order")
        yield
    finally:
        demo.control(lg, "POST", "/resume", {})


def create(demo: Demo, customer: str, items: list[tuple[str, int]],
           request_id: str | None = None, timeout_s: float = 10) -> order_pb2.OrderView:
    return demo.order().CreateOrder(order_pb2.CreateOrderRequest(
        request_id=request_id or f"test-{uuid.uuid4().hex}", customer=customer,
        items=[order_pb2.Item(sku=s, quantity=q) for s, q in items]), timeout=timeout_s)


def ledger(demo: Demo, order_id: str) -> list[tuple[str, int]]:
    resp = demo.payment().ListLedger(payment_pb2.ListLedgerRequest(order_id=order_id), timeout=5)
    return [(e.kind, e.amount_cents) for e in resp.entries]


def reservations(demo: Demo, order_id: str) -> list[tuple[str, int, str]]:
    resp = demo.inventory().ListReservations(
        inventory_pb2.ListReservationsRequest(order_id=order_id), timeout=5)
    return sorted((r.sku, r.quantity, r.state) for r in resp.reservations)


def test_up_starts_every_process_and_syncs_the_mesh(demo: Demo) -> None:
    st = demo.state
    assert st.complete
    kinds: dict[tuple[str, str], int] = {}
    for p in st.processes:
        kinds[(p.role, p.service)] = kinds.get((p.role, p.service), 0) + 1
        assert is_ours(p), p
        assert Path(p.log).exists()
    assert kinds == EXPECTED
    for p in st.find("app"):
        assert p.address.startswith("127.0.0.1:") and p.control.startswith("127.0.0.1:"), p
        assert p.db == str(demo.base / ".mesh" / "data" / f"{p.service}.sqlite")
    for p in st.find("sidecar"):
        outbound_only = p.service in ("loadgen", "gateway")
        assert p.outbound and p.admin and (p.inbound == "") == outbound_only, p
    gw = st.one("gateway")
    assert gw.address == demo.env["MESH_DEMO_GATEWAY"] and gw.outbound, gw
    assert st.control_plane["api"] == demo.env["MESH_CONTROL_PLANE"]
    for token in (demo.base / ".mesh" / "tokens").iterdir():
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, token
    # meshctl finds this control plane through the same environment
    r = demo.cli("control_plane.meshctl", "status", "-o", "json", timeout_s=30)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["instance"] for row in rows} == {p.instance for p in st.find("sidecar")}
    assert {row["state"] for row in rows} == {"SYNCED"}


def test_happy_path_confirms_and_moves_stock_and_money_once(demo: Demo) -> None:
    with load_paused(demo):
        balance = demo.payment().GetBalance(payment_pb2.GetBalanceRequest(customer="cust-11"),
                                            timeout=5).balance_cents
        stock = demo.inventory().GetStock(inventory_pb2.GetStockRequest(sku="sku-cheese"),
                                          timeout=5).stock
        view = create(demo, "cust-11", [("sku-cheese", 3), ("sku-apple", 1)])
        assert view.state == "CONFIRMED", view
        assert view.amount_cents == 3 * 899 + 120
        after = demo.payment().GetBalance(payment_pb2.GetBalanceRequest(customer="cust-11"),
                                          timeout=5).balance_cents
        stock_after = demo.inventory().GetStock(inventory_pb2.GetStockRequest(sku="sku-cheese"),
                                                timeout=5).stock
    assert balance - after == view.amount_cents
    assert (stock.available - stock_after.available, stock_after.reserved - stock.reserved) == (3, 3)
    assert ledger(demo, view.order_id) == [("CHARGE", view.amount_cents)]
    assert reservations(demo, view.order_id) == [("sku-apple", 1, "RESERVED"),
                                                  ("sku-cheese", 3, "RESERVED")]
    got = demo.order().GetOrder(order_pb2.GetOrderRequest(order_id=view.order_id), timeout=5)
    assert got.state == "CONFIRMED" and got.version == view.version


def test_declined_payment_is_cancelled_and_its_stock_released(demo: Demo) -> None:
    view = create(demo, "cust-broke", [("sku-bread", 2)])
    assert view.state == "CANCELLED" and "insufficient funds" in view.reason, view
    assert sum(a if k == "CHARGE" else -a for k, a in ledger(demo, view.order_id)) == 0
    # reserved first (forward step), then released (compensation)
    assert reservations(demo, view.order_id) == [("sku-bread", 2, "RELEASED")]


def test_out_of_stock_is_cancelled_with_nothing_charged_or_reserved(demo: Demo) -> None:
    view = create(demo, "cust-12", [("sku-apple", 1), ("sku-saffron", 1000)])
    assert view.state == "CANCELLED" and "out of stock" in view.reason, view
    assert "sku-saffron" in view.reason
    assert ledger(demo, view.order_id) == []
    assert not [r for r in reservations(demo, view.order_id) if r[2] == "RESERVED"]


def test_create_order_retried_with_the_same_request_id_creates_one_order(demo: Demo) -> None:
    rid = f"test-retry-{uuid.uuid4().hex}"
    items = [("sku-coffee", 1)]
    with cf.ThreadPoolExecutor(3) as pool:
        views = list(pool.map(lambda _: create(demo, "cust-13", items, rid), range(3)))
    views.append(create(demo, "cust-13", items, rid))
    assert len({v.order_id for v in views}) == 1, views
    assert views[-1].state == "CONFIRMED"
    mine = [o for o in demo.all_orders() if o.request_id == rid]
    assert len(mine) == 1
    assert ledger(demo, mine[0].order_id) == [("CHARGE", 1250)]


def test_the_same_charge_sent_twice_charges_once(demo: Demo) -> None:
    order_id = f"test-direct-{uuid.uuid4().hex}"
    req = payment_pb2.ChargeRequest(order_id=order_id, customer="cust-14", amount_cents=777)
    first = demo.payment().Charge(req, timeout=5)
    second = demo.payment().Charge(req, timeout=5)
    assert (first.charged, first.replayed) == (True, False)
    assert (second.charged, second.replayed, second.amount_cents) == (True, True, 777)
    assert ledger(demo, order_id) == [("CHARGE", 777)]
    # leave no money behind for the audit: refund it (twice: once)
    assert demo.payment().Refund(payment_pb2.RefundRequest(order_id=order_id),
                                 timeout=5).refunded
    assert demo.payment().Refund(payment_pb2.RefundRequest(order_id=order_id),
                                 timeout=5).replayed
    assert ledger(demo, order_id) == [("CHARGE", 777), ("REFUND", 777)]


def test_a_late_charge_after_its_refund_is_refused(demo: Demo) -> None:
    order_id = f"test-late-{uuid.uuid4().hex}"
    refund = demo.payment().Refund(payment_pb2.RefundRequest(order_id=order_id), timeout=5)
    assert not refund.refunded
    with pytest.raises(grpc.RpcError) as info:
        demo.payment().Charge(payment_pb2.ChargeRequest(order_id=order_id, customer="cust-15",
                                                        amount_cents=500), timeout=5)
    assert info.value.code() == grpc.StatusCode.ABORTED, info.value
    assert ledger(demo, order_id) == []


def order_retries(demo: Demo) -> int:
    """Retries the load generator's sidecar (the test's way in) made of calls to order."""
    admin = demo.state.one("sidecar", "loadgen").admin
    with urllib.request.urlopen(f"http://{admin}/stats", timeout=5) as r:
        outbound = json.load(r)["outbound"]
    retries = outbound.get("retries") or outbound.get("routing", {}).get("retries", {})
    return sum(retries.get("order", {}).get("retried", {}).values())


def test_an_order_replica_killed_mid_saga_leaves_every_saga_terminal(demo: Demo) -> None:
    victim, survivor = demo.app("order-1"), demo.app("order-2")
    payments = demo.state.find("app", "payment")
    recovered_before = demo.control(survivor, "GET", "/sagas")["recovered_here"]
    retried_before = order_retries(demo)
    for p in payments:   # slow charges: sagas stay in flight
        demo.control(p, "POST", "/sickness", {"latency_ms": SICK_LATENCY_MS})
    items = [("sku-apple", 1)]
    rids = [f"test-kill-{i}-{uuid.uuid4().hex[:8]}" for i in range(8)]
    pool = cf.ThreadPoolExecutor(len(rids))
    try:
        futures = [pool.submit(create, demo, f"cust-0{1 + i % 9}", items, rid, 15)
                   for i, rid in enumerate(rids)]
        procs.wait_for(lambda: demo.control(victim, "GET", "/sagas")["running_here"] >= 2, 15,
                       what="order-1 running sagas")
        os.kill(victim.pid, signal.SIGKILL)
        procs.wait_for(lambda: not is_ours(victim), 5, what="order-1 gone")
        for p in payments:
            demo.control(p, "DELETE", "/sickness")
        answers = []
        for f in futures:
            try:
                answers.append(f.result())
            except grpc.RpcError as err:   # the calls order-1 was serving
                answers.append(err)
    finally:
        pool.shutdown(wait=True)
    # The kill reached calls in flight at order-1: either their callers saw it, or the
    # caller's sidecar retried them (order-1's sidecar answered UNAVAILABLE before any
    # response headers, so the mesh may send them again, to order-2).
    assert any(isinstance(a, grpc.RpcError) for a in answers) \
        or order_retries(demo) > retried_before, "no call reached order-1"

    # A client retries with the same request id: the surviving replica answers with the
    # same order, terminal once it resumed the saga whose lease expired.
    def all_terminal() -> dict[str, order_pb2.OrderView] | None:
        views = {rid: create(demo, f"cust-0{1 + i % 9}", items, rid, 5)
                 for i, rid in enumerate(rids)}
        return views if all(v.state in ("CONFIRMED", "CANCELLED") for v in views.values()) \
            else None

    views = procs.wait_for(all_terminal, 30, interval_s=0.5, what="every saga terminal")
    for a, rid in zip(answers, rids, strict=True):
        if isinstance(a, order_pb2.OrderView) and a.order_id:
            assert views[rid].order_id == a.order_id
    assert all(v.state == "CONFIRMED" for v in views.values()), views
    assert demo.control(survivor, "GET", "/sagas")["recovered_here"] > recovered_before
    mine = [o for o in demo.all_orders() if o.request_id in set(rids)]
    assert len(mine) == len(rids)
    assert {o.state for o in mine} == {"CONFIRMED"}


def test_check_audits_every_invariant_and_passes(demo: Demo) -> None:
    r = demo.cli("demo_services.check", "--wait", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("no order in flight", "CONFIRMED => charged once", "CANCELLED => net charge",
                 "money conserved", "stock conserved", "read model equals a replay"):
        assert any(line.startswith("ok ") and name in line for line in r.stdout.splitlines()), \
            (name, r.stdout)
    stats = demo.control(demo.state.one("loadgen"), "GET", "/stats")
    assert not stats["paused"] and stats["mismatches"] == 0, stats
    assert stats["confirmed"] > 0 and stats["sent"] > 0, stats


def test_a_second_up_says_so_and_fails(demo: Demo) -> None:
    r = demo.demo("up")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "already running" in r.stderr, r.stderr
    assert load_state(demo.base / ".mesh" / "state.json").processes == demo.state.processes


def test_down_stops_every_process_and_is_safe_to_run_twice(demo: Demo) -> None:
    first = demo.demo("down")
    assert first.returncode == 0, first.stderr
    assert not [p for p in demo.state.processes if is_ours(p)]
    assert not (demo.base / ".mesh" / "state.json").exists()
    second = demo.demo("down")
    assert second.returncode == 0, second.stderr
    assert "nothing to stop" in second.stdout
