"""The demo's authorization, as a user runs the demo (``python -m demo_services.demo up`` on
free ports in a tmp dir): it denies by default and ships policies for the saga (loadgen may
call order; order may call payment and inventory; nothing else). The saga still runs, the
load generator cannot reach payment or inventory, and ``meshctl`` says so. One demo is shared
by the module; nothing here changes it.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest

from protos.inventory import inventory_pb2, inventory_pb2_grpc
from protos.order import order_pb2
from protos.payment import payment_pb2, payment_pb2_grpc
from tests.support import procs
from tests.support.demo import Demo, demo_env, running_demo

pytestmark = pytest.mark.timeout(180)

TD = "mesh.local"
LOADGEN, ORDER = f"spiffe://{TD}/service/loadgen", f"spiffe://{TD}/service/order"
CHARGE = "/payment.Payment/Charge"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    base = tmp_path_factory.mktemp("authz-demo")
    with running_demo(base, demo_env(base, rps=5, lease_s=1.5)) as d:
        yield d


def meshctl(demo: Demo, *args: str) -> tuple[int, str, str]:
    r = demo.cli("control_plane.meshctl", *args, timeout_s=30)
    return r.returncode, r.stdout, r.stderr


def loadgen_channel(demo: Demo, authority: str) -> grpc.Channel:
    """Straight through the load generator's sidecar (its identity), whatever the target."""
    outbound = demo.state.one("sidecar", "loadgen").outbound
    return grpc.insecure_channel(outbound, options=[("grpc.default_authority", authority)])


def test_the_demo_denies_by_default_and_ships_the_sagas_policies(demo: Demo) -> None:
    code, out, err = meshctl(demo, "authz", "default")
    assert code == 0 and out.strip() == "deny", out + err
    code, out, err = meshctl(demo, "get", "authorizationpolicies", "-o", "json")
    assert code == 0, err
    by_service = {d["spec"]["service"]: d for d in json.loads(out)}
    assert set(by_service) == {"order", "payment", "inventory"}
    assert by_service["order"]["spec"]["rules"][0]["sources"] == [LOADGEN]
    assert by_service["payment"]["spec"]["rules"][0]["sources"] == [ORDER]


def test_the_saga_runs_under_the_policies(demo: Demo) -> None:
    view = demo.order().CreateOrder(order_pb2.CreateOrderRequest(
        request_id=f"authz-{uuid.uuid4().hex}", customer="cust-12",
        items=[order_pb2.Item(sku="sku-apple", quantity=1)]), timeout=15)
    assert view.state == "CONFIRMED", view
    ledger = demo.payment().ListLedger(payment_pb2.ListLedgerRequest(order_id=view.order_id),
                                       timeout=5)
    assert [(e.kind, e.amount_cents) for e in ledger.entries] == [("CHARGE",
                                                                   view.amount_cents)]
    lg = demo.state.one("loadgen")
    procs.wait_for(lambda: demo.control(lg, "GET", "/stats")["confirmed"] > 0, 30,
                   what="the load generator's sagas confirmed")
    assert demo.control(lg, "GET", "/stats")["mismatches"] == 0


def test_loadgen_cannot_reach_payment_or_inventory(demo: Demo) -> None:
    with loadgen_channel(demo, "payment") as ch:
        with pytest.raises(grpc.RpcError) as info:
            payment_pb2_grpc.PaymentStub(ch).Charge(payment_pb2.ChargeRequest(
                order_id=f"authz-{uuid.uuid4().hex}", customer="cust-13", amount_cents=100),
                timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    details = info.value.details() or ""
    assert LOADGEN in details and CHARGE in details and "payment-callers" in details
    with loadgen_channel(demo, "inventory") as ch:
        with pytest.raises(grpc.RpcError) as info:
            inventory_pb2_grpc.InventoryStub(ch).GetStock(
                inventory_pb2.GetStockRequest(sku="sku-apple"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    # counted by a payment sidecar as a denial because no rule of payment-callers allows it
    admins = [p.admin for p in demo.state.find("sidecar", "payment")]

    def denied_counted() -> bool:
        total = 0
        for admin in admins:
            with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("mesh_authz_decisions_total{") and \
                            'decision="deny"' in line and 'mode="enforce"' in line:
                        total += float(line.rsplit(" ", 1)[1])
        return total >= 1
    procs.wait_for(denied_counted, 10, what="the denial in a payment sidecar's /metrics")


def test_authz_check_agrees(demo: Demo) -> None:
    code, out, _ = meshctl(demo, "authz", "check", LOADGEN, "payment", CHARGE)
    assert code == 1 and out.startswith("deny"), out
    code, out, _ = meshctl(demo, "authz", "check", ORDER, "payment", CHARGE)
    assert code == 0 and out.startswith("allow") and "payment-callers" in out, out
    code, out, _ = meshctl(demo, "authz", "check", "loadgen", "order", "/order.Order/CreateOrder")
    assert code == 0 and "order-callers" in out, out
    code, out, _ = meshctl(demo, "authz", "check", "payment", "inventory",
                           "/inventory.Inventory/Reserve")
    assert code == 1 and out.startswith("deny"), out
