"""The order service: ``OrderService`` (the logic: idempotent create, get, list, watch) and
``OrderServicer`` (the thin ``order.Order`` gRPC layer), plus ``build_spec`` which assembles
store, participants, saga runner/manager and servicer into a ``ServiceSpec`` for ``serve``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from demo_services.common import catalog
from demo_services.common.errors import BusinessError, abort_with
from demo_services.common.server import ServiceSpec
from protos.order import order_pb2, order_pb2_grpc

from . import events as ev
from .participants import GrpcParticipants, Participants, channels_to
from .runner import Clock, SagaManager, SagaRunner
from .saga import SagaPolicy
from .store import OrderStore

log = logging.getLogger("demo.order")

MAX_ID_CHARS = 200
MAX_ITEMS = 100
MAX_QUANTITY = 1_000_000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_WAIT_S = 30.0          # CreateOrder without a deadline waits at most this long
POLL_S = 0.05              # how often waiters look at the read model for other replicas' work
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class ChangeFeed:
    """Wakes this replica's waiters (CreateOrder, WatchOrder) when its runners store a change;
    changes by other replicas are seen by polling the read model every ``POLL_S``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def notify(self, order_id: str = "") -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def mark(self) -> int:
        """The current change count (pass it to ``wait``)."""
        with self._cond:
            return self._count

    def wait(self, mark: int, timeout_s: float) -> None:
        """Return once a change after ``mark`` was notified, or after ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: self._count != mark, timeout=max(timeout_s, 0.0))


def validate_order(request_id: str, customer: str,
                   items: Sequence[tuple[str, int]]) -> ev.Items:
    """The order's items with repeated SKUs added up (first-seen order). Raises
    BusinessError(INVALID_ARGUMENT) naming the first problem: an empty or over-long
    (> 200 characters) request id or customer, no items or more than 100, an unknown SKU, a
    quantity outside 1..1,000,000."""
    if not request_id or len(request_id) > MAX_ID_CHARS:
        raise BusinessError(_INVALID, f"request_id: 1 to {MAX_ID_CHARS} characters required")
    if not customer or len(customer) > MAX_ID_CHARS:
        raise BusinessError(_INVALID, f"customer: 1 to {MAX_ID_CHARS} characters required")
    if not items:
        raise BusinessError(_INVALID, "items: at least one item required")
    if len(items) > MAX_ITEMS:
        raise BusinessError(_INVALID, f"items: at most {MAX_ITEMS}, got {len(items)}")
    merged: dict[str, int] = {}
    for sku, quantity in items:
        if sku not in catalog.PRICES:
            raise BusinessError(_INVALID, f"items: unknown sku {sku!r}")
        if not 0 < quantity <= MAX_QUANTITY:
            raise BusinessError(_INVALID, f"items: quantity of {sku} must be 1 to "
                                          f"{MAX_QUANTITY}, got {quantity}")
        merged[sku] = merged.get(sku, 0) + quantity
    if any(q > MAX_QUANTITY for q in merged.values()):
        raise BusinessError(_INVALID, f"items: at most {MAX_QUANTITY} of one sku")
    return tuple(merged.items())


def encode_page_token(state: str, after_seq: int) -> str:
    raw = json.dumps({"s": state, "a": after_seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, state: str) -> int:
    """The ``after_seq`` a token from ``encode_page_token`` carries; BusinessError
    (INVALID_ARGUMENT) if it is malformed or was made for another state filter."""
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, token_state = int(doc["a"]), str(doc["s"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise BusinessError(_INVALID, "page_token: not a token from ListOrders")
    if token_state != state:
        raise BusinessError(_INVALID, "page_token: made for another state filter")
    return after


class OrderService:
    """The order service's logic, independent of gRPC's server API. Errors are raised as
    BusinessError (INVALID_ARGUMENT, NOT_FOUND)."""

    def __init__(self, store: OrderStore, manager: SagaManager, feed: ChangeFeed, *,
                 new_order_id: Callable[[], str] = lambda: f"ord-{uuid.uuid4().hex[:20]}",
                 poll_s: float = POLL_S) -> None:
        self.store = store
        self.manager = manager
        self.feed = feed
        self.new_order_id = new_order_id
        self.poll_s = poll_s

    @property
    def runner(self) -> SagaRunner:
        return self.manager.runner

    def create(self, request_id: str, customer: str, items: Sequence[tuple[str, int]],
               wait_s: float = MAX_WAIT_S) -> ev.OrderView:
        """The order for ``request_id``, created (and its saga started here, this replica
        holding the lease) unless the request id was seen before; then the same order, never a
        second one. Returns its view once terminal, or the PENDING view after ``wait_s``
        seconds while its saga goes on. Raises BusinessError(INVALID_ARGUMENT) (see
        ``validate_order``)."""
        merged = validate_order(request_id, customer, items)
        r = self.runner
        view, created = self.store.create_order(
            order_id=self.new_order_id(), request_id=request_id, customer=customer,
            items=merged, amount_cents=catalog.amount_cents(list(merged)), owner=r.owner,
            now_unix=r.clock(), lease_s=r.lease_s, by=r.owner)
        if created:
            log.debug("order %s created for request %s (%d cents)", view.order_id,
                      request_id, view.amount_cents)
            self.feed.notify(view.order_id)
            self.manager.submit(view.order_id)
        return self.wait_terminal(view.order_id, wait_s)

    def wait_terminal(self, order_id: str, timeout_s: float) -> ev.OrderView:
        """The order's view once terminal, or as it is after ``timeout_s`` seconds."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            mark = self.feed.mark()
            view = self.get(order_id)
            remaining = deadline - time.monotonic()
            if view.terminal or remaining <= 0:
                return view
            self.feed.wait(mark, min(self.poll_s, remaining))

    def get(self, order_id: str) -> ev.OrderView:
        """The order's view; BusinessError(NOT_FOUND) if unknown."""
        view = self.store.get(order_id) if order_id else None
        if view is None:
            raise BusinessError(grpc.StatusCode.NOT_FOUND, f"no order {order_id!r}")
        return view

    def list_orders(self, state: str = "", page_size: int = 0,
             page_token: str = "") -> tuple[list[ev.OrderView], str]:
        """One page of orders in creation order (stable: a page never repeats or skips an
        order), of ``state`` if given: ``(views, next_page_token)``, the token "" on the last
        page. ``page_size`` 0 means 100; more than 1000 is clamped to 1000. Raises
        BusinessError(INVALID_ARGUMENT) for an unknown state, a negative page size or a bad
        token."""
        if state and state not in ev.ORDER_STATES:
            raise BusinessError(_INVALID, f"state: one of {', '.join(ev.ORDER_STATES)} or "
                                          f"empty, got {state!r}")
        if page_size < 0:
            raise BusinessError(_INVALID, f"page_size: must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token, state) if page_token else 0
        views = self.store.list_orders(state, after, size + 1)
        if len(views) > size:
            return views[:size], encode_page_token(state, views[size - 1].seq)
        return views, ""

    def watch(self, order_id: str, is_active: Callable[[], bool] = lambda: True,
              ) -> Iterator[ev.OrderView]:
        """The order's view now, then one view per change (each event applied in turn), until
        it is terminal or ``is_active()`` is false. Raises BusinessError(NOT_FOUND) at once if
        the order is unknown."""
        view = self.get(order_id)
        yield view
        while not view.terminal and is_active():
            mark = self.feed.mark()
            current = self.store.get(order_id)
            if current is not None and current.version > view.version:
                for event in self.store.events(order_id, view.version):
                    view = ev.apply(view, event)
                    yield view
                continue
            self.feed.wait(mark, self.poll_s)


def to_proto(view: ev.OrderView) -> order_pb2.OrderView:
    return order_pb2.OrderView(
        order_id=view.order_id, request_id=view.request_id, customer=view.customer,
        items=[order_pb2.Item(sku=s, quantity=q) for s, q in view.items],
        amount_cents=view.amount_cents, state=view.state, reason=view.reason,
        created_at_unix=view.created_at_unix, updated_at_unix=view.updated_at_unix,
        version=view.version)


def wait_budget_s(time_remaining_s: float | None, max_wait_s: float = MAX_WAIT_S) -> float:
    """How long CreateOrder may wait for the saga: until shortly before the call's deadline
    (keeping a fifth of the remaining time, at most 0.25 s, to answer), at most
    ``max_wait_s``; ``max_wait_s`` without a deadline (None, or gRPC's huge 'no deadline')."""
    if time_remaining_s is None:
        return max_wait_s
    margin = min(0.25, 0.2 * max(time_remaining_s, 0.0))
    return max(0.0, min(max_wait_s, time_remaining_s - margin))


class OrderServicer(order_pb2_grpc.OrderServicer):
    """``order.Order`` over ``OrderService``: protos in and out, BusinessError -> status."""

    def __init__(self, service: OrderService, max_wait_s: float = MAX_WAIT_S) -> None:
        self.service = service
        self.max_wait_s = max_wait_s

    def CreateOrder(self, request: order_pb2.CreateOrderRequest,
                    context: grpc.ServicerContext) -> order_pb2.OrderView:
        wait_s = wait_budget_s(context.time_remaining(), self.max_wait_s)
        try:
            view = self.service.create(request.request_id, request.customer,
                                       [(i.sku, int(i.quantity)) for i in request.items],
                                       wait_s)
        except BusinessError as err:
            abort_with(context, err)
        return to_proto(view)

    def GetOrder(self, request: order_pb2.GetOrderRequest,
                 context: grpc.ServicerContext) -> order_pb2.OrderView:
        try:
            return to_proto(self.service.get(request.order_id))
        except BusinessError as err:
            abort_with(context, err)
        raise AssertionError("unreachable")

    def ListOrders(self, request: order_pb2.ListOrdersRequest,
                   context: grpc.ServicerContext) -> order_pb2.ListOrdersResponse:
        try:
            views, token = self.service.list_orders(request.state, request.page_size,
                                             request.page_token)
        except BusinessError as err:
            abort_with(context, err)
        return order_pb2.ListOrdersResponse(orders=[to_proto(v) for v in views],
                                            next_page_token=token)

    def WatchOrder(self, request: order_pb2.GetOrderRequest,
                   context: grpc.ServicerContext) -> Iterator[order_pb2.OrderView]:
        try:
            for view in self.service.watch(request.order_id, context.is_active):
                yield to_proto(view)
        except BusinessError as err:
            abort_with(context, err)


# --------------------------------------------------------------------------- assembly


@dataclass(frozen=True)
class OrderSettings:
    """A replica's settings (seconds): ``lease_s`` a saga lease, ``step_budget_s`` how long a
    forward step may fail transiently before it is compensated, ``call_timeout_s`` each
    participant call; ``max_wait_s`` CreateOrder's wait without a deadline. ``direct``:
    participants called straight at their replicas' addresses, without the mesh
    (``(service, (HOST:PORT, ...))`` pairs); the others through ``outbound``."""

    instance: str
    db_path: Path
    outbound: str
    lease_s: float = 5.0
    step_budget_s: float = 10.0
    call_timeout_s: float = 2.0
    max_wait_s: float = MAX_WAIT_S
    workers: int = 32          # saga runner threads
    grpc_workers: int = 64     # gRPC handler threads
    direct: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass
class OrderApp:
    """Everything one order replica runs, wired together."""

    store: OrderStore
    feed: ChangeFeed
    runner: SagaRunner
    manager: SagaManager
    service: OrderService
    participants: Participants


def build_app(settings: OrderSettings, participants: Participants | None = None,
              clock: Clock = time.time) -> OrderApp:
    """Create the database if needed and wire store, participants (gRPC through the sidecar
    unless given), runner, manager and service. Starts nothing. Raises sqlite3.Error or
    OSError if the database cannot be opened."""
    store = OrderStore(settings.db_path)
    store.init()
    feed = ChangeFeed()
    parts = participants or GrpcParticipants(settings.outbound, settings.call_timeout_s,
                                             channel_factory=channels_to(dict(settings.direct)))
    owner = f"{settings.instance}/{os.getpid()}/{secrets.token_hex(3)}"
    runner = SagaRunner(store, parts, owner, lease_s=settings.lease_s,
                        policy=SagaPolicy(step_budget_s=settings.step_budget_s),
                        clock=clock, on_change=feed.notify)
    manager = SagaManager(runner, workers=settings.workers)
    return OrderApp(store, feed, runner, manager, OrderService(store, manager, feed), parts)


def build_spec(settings: OrderSettings, participants: Participants | None = None) -> ServiceSpec:
    """The ``ServiceSpec`` of an order replica: ``order.Order``, the recovery thread started
    and stopped with the server, and the control route ``GET /sagas``."""
    app = build_app(settings, participants)

    def add_servicers(server: grpc.Server) -> None:
        order_pb2_grpc.add_OrderServicer_to_server(
            OrderServicer(app.service, settings.max_wait_s), server)

    def sagas(body: Any) -> tuple[int, Any]:
        return 200, {"instance": settings.instance, **app.manager.status()}

    def on_stop() -> None:
        app.manager.stop(timeout_s=settings.call_timeout_s + 1.0)
        close = getattr(app.participants, "close", None)
        if close is not None:
            close()

    # CreateOrder handlers wait for their saga (up to the call's deadline) and WatchOrder
    # streams hold a thread each, so order serves with more threads than the default.
    return ServiceSpec(name="order", instance=settings.instance,
                       grpc_services=("order.Order",), add_servicers=add_servicers,
                       control_routes={("GET", "/sagas"): sagas},
                       on_start=app.manager.start, on_stop=on_stop,
                       workers=settings.grpc_workers)
