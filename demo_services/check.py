"""``python -m demo_services.check [--wait S]``: audit the running demo.

Reads ``<MESH_DEMO_DIR>/state.json``, pauses the load generator (if it was running), waits
up to S seconds (default 30) until it has no call in flight and no order is PENDING, fetches
through the services' own read APIs (the apps' addresses, any live replica: ListOrders paged,
ListLedger, payment Summary, ListReservations, inventory Summary) and runs
``python -m demo_services.order rebuild --db ...`` for "the read model equals a replay",
resumes the load, prints each invariant (``demo_services.audit``) with its counts and exits
0 iff all hold; 1 if one does not; 2 if it cannot audit (no demo, a service unreachable).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from demo_services.audit import (
    AuditData,
    Invariant,
    LedgerEntry,
    Money,
    Order,
    Reservation,
    Stock,
    audit,
    orphans,
)
from demo_services.launcher import procs
from demo_services.launcher.settings import SettingsError, from_env
from demo_services.launcher.state import DemoState, StateError, load
from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.numbers import finite_arg
from protos.inventory import inventory_pb2, inventory_pb2_grpc
from protos.order import order_pb2, order_pb2_grpc
from protos.payment import payment_pb2, payment_pb2_grpc

PROG = "check"
RPC_TIMEOUT_S = 10.0
PAGE_SIZE = 1000
REBUILD_TIMEOUT_S = 120.0
T = TypeVar("T")


class CheckError(Exception):
    """The audit cannot run (one line)."""


def _say(line: str) -> None:
    print(f"{PROG}: {line}", flush=True)


# ---------------------------------------------------------------- the load generator

def _loadgen(state: DemoState, method: str, path: str) -> dict[str, Any] | None:
    found = state.find("loadgen")
    if not found or not found[0].control:
        return None
    req = urllib.request.Request(f"http://{found[0].control}{path}", method=method,
                                 data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the services

def _call(state: DemoState, service: str, fn: Callable[[grpc.Channel], T]) -> T:
    """``fn(channel)`` against the first replica of ``service`` that answers (plaintext to
    the app's own address, behind its sidecar). Raises CheckError if none does."""
    errors = []
    for app in state.find("app", service):
        if not app.address or not procs.is_ours(app):
            errors.append(f"{app.instance}: not running")
            continue
        with grpc.insecure_channel(app.address) as ch:
            try:
                return fn(ch)
            except grpc.RpcError as exc:
                errors.append(f"{app.instance}: {exc.code().name} "  # type: ignore[attr-defined]
                              f"{exc.details()}")  # type: ignore[attr-defined]
    raise CheckError(f"no {service} replica answered ({'; '.join(errors) or 'none listed'})")


def list_orders(state: DemoState, only_state: str = "") -> list[order_pb2.OrderView]:
    """Every order (of ``only_state``), page by page."""
    def fetch(ch: grpc.Channel) -> list[order_pb2.OrderView]:
        stub = order_pb2_grpc.OrderStub(ch)
        out: list[order_pb2.OrderView] = []
        token = ""
        while True:
            resp = stub.ListOrders(order_pb2.ListOrdersRequest(
                state=only_state, page_size=PAGE_SIZE, page_token=token), timeout=RPC_TIMEOUT_S)
            out.extend(resp.orders)
            token = resp.next_page_token
            if not token:
                return out
    return _call(state, "order", fetch)


def wait_quiet(state: DemoState, wait_s: float) -> float | None:
    """Wait until the load generator has no call in flight and no order is PENDING; the
    seconds it took, or None if ``wait_s`` passed first."""
    t0 = time.monotonic()
    while True:
        stats = _loadgen(state, "GET", "/stats")
        busy = stats is not None and stats.get("in_flight", 0) > 0
        if not busy:
            try:
                if not list_orders(state, "PENDING"):
                    return time.monotonic() - t0
            except CheckError:
                pass
        if time.monotonic() - t0 >= wait_s:
            return None
        time.sleep(0.2)


def rebuild(state: DemoState) -> tuple[bool, str]:
    """(read model equals a replay, the rebuild's last output line)."""
    apps = state.find("app", "order")
    if not apps or not apps[0].db:
        raise CheckError("state.json lists no order database")
    r = subprocess.run([sys.executable, "-m", "demo_services.order", "rebuild", "--db",
                        apps[0].db], capture_output=True, text=True, timeout=REBUILD_TIMEOUT_S,
                       env=procs.child_env())
    lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
    return r.returncode == 0, (lines[-1] if lines else f"exit {r.returncode}")


def fetch(state: DemoState) -> AuditData:
    """Everything the audit needs, from the services' read APIs. Raises CheckError."""
    orders = [Order(o.order_id, o.state, o.amount_cents,
                    tuple((i.sku, i.quantity) for i in o.items), o.customer, o.reason)
              for o in list_orders(state)]
    ledger = _call(state, "payment", lambda ch: payment_pb2_grpc.PaymentStub(ch).ListLedger(
        payment_pb2.ListLedgerRequest(), timeout=RPC_TIMEOUT_S)).entries
    money = _call(state, "payment", lambda ch: payment_pb2_grpc.PaymentStub(ch).Summary(
        payment_pb2.SummaryRequest(), timeout=RPC_TIMEOUT_S))
    reservations = _call(state, "inventory", lambda ch: inventory_pb2_grpc.InventoryStub(ch)
                         .ListReservations(inventory_pb2.ListReservationsRequest(),
                                           timeout=RPC_TIMEOUT_S)).reservations
    stock = _call(state, "inventory", lambda ch: inventory_pb2_grpc.InventoryStub(ch).Summary(
        inventory_pb2.SummaryRequest(), timeout=RPC_TIMEOUT_S)).stock
    equal, detail = rebuild(state)
    return AuditData(
        orders=tuple(orders),
        ledger=tuple(LedgerEntry(e.order_id, e.kind, e.amount_cents, e.customer)
                     for e in ledger),
        reservations=tuple(Reservation(r.order_id, r.sku, r.quantity, r.state)
                           for r in reservations),
        money=Money(money.opening_total_cents, money.balances_total_cents,
                    money.merchant_takings_cents),
        stock=tuple(Stock(s.sku, s.opening, s.available, s.reserved) for s in stock),
        replay_equal=equal, replay_detail=detail)


# ---------------------------------------------------------------- report

def report(results: list[Invariant], data: AuditData) -> None:
    for inv in results:
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in inv.counts.items())
        print(f"{'ok  ' if inv.ok else 'FAIL'}  {inv.name:<48} {counts}", flush=True)
        for p in inv.problems:
            print(f"        - {p}", flush=True)
    left = orphans(data)
    if left["orders"]:
        print(f"note  {left['orders']} order id(s) unknown to the order service have ledger "
              f"entries or reservations (net charge {left['net_charge_cents']} cents, "
              f"reserved {left['reserved']}): direct calls to payment or inventory", flush=True)


def audit_demo(state: DemoState, wait_s: float,
               say: Callable[[str], None] = _say) -> tuple[list[Invariant], AuditData]:
    """Pause the load (if it runs), wait up to ``wait_s`` for no order in flight, fetch and
    audit, resume. Raises CheckError when it cannot audit."""
    before = _loadgen(state, "GET", "/stats")
    paused_here = before is not None and not before.get("paused", False)
    if paused_here:
        _loadgen(state, "POST", "/pause")
        say("load generator paused")
    elif before is None:
        say("load generator not answering: auditing without pausing it")
    try:
        took = wait_quiet(state, wait_s)
        say(f"no order in flight after {took:.1f}s" if took is not None else
            f"orders still in flight after {wait_s:g}s; auditing anyway")
        data = fetch(state)
    finally:
        if paused_here:
            _loadgen(state, "POST", "/resume")
            say("load generator resumed")
    return audit(data), data


def run(wait_s: float) -> int:
    try:
        state = load(from_env().state_path)
    except (SettingsError, StateError) as exc:
        _say(f"error: {exc}")
        return 2
    try:
        results, data = audit_demo(state, wait_s)
    except CheckError as exc:
        _say(f"error: {exc}")
        return 2
    report(results, data)
    failed = [r for r in results if not r.ok]
    _say(f"all {len(results)} invariants hold" if not failed else
         f"{len(failed)} of {len(results)} invariants broken")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="python -m demo_services.check",
                              description="Audit the running demo's invariants.")
    p.add_argument("--wait", type=finite_arg, default=30.0,
                   help="seconds to wait for no order in flight (default 30)")
    args = p.parse_args(argv)
    if args.wait < 0:
        p.error("--wait must be >= 0")
    return run(args.wait)


if __name__ == "__main__":
    sys.exit(main())
