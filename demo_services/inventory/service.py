"""The ``inventory.Inventory`` servicer: a thin gRPC face on ``StockBook``.

A BusinessError (business answers and bad arguments) becomes its status with
``abort_with``; a SQLite error (e.g. the file stayed locked past the busy timeout) becomes
UNAVAILABLE, which is safe to retry because every write is idempotent and rolled back whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from demo_services.common.errors import answer
from demo_services.common.server import ServiceSpec
from protos.inventory import inventory_pb2, inventory_pb2_grpc

from .stock import StockBook, StockLevel

SERVICE_NAME = inventory_pb2.DESCRIPTOR.services_by_name["Inventory"].full_name
T = TypeVar("T")


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    return answer(context, fn, "inventory")


def _stock_pb(s: StockLevel) -> inventory_pb2.Stock:
    return inventory_pb2.Stock(sku=s.sku, available=s.available, reserved=s.reserved,
                               opening=s.opening, price_cents=s.price_cents)


class InventoryServicer(inventory_pb2_grpc.InventoryServicer):
    """``inventory.Inventory`` over one ``StockBook`` (the replica's view of the shared file)."""

    def __init__(self, book: StockBook) -> None:
        self.book = book

    def Reserve(self, request: inventory_pb2.ReserveRequest,
                context: grpc.ServicerContext) -> inventory_pb2.ReserveResponse:
        items = [(i.sku, i.quantity) for i in request.items]
        r = _call(context, lambda: self.book.reserve(request.order_id, items))
        return inventory_pb2.ReserveResponse(order_id=r.order_id, reserved=r.reserved,
                                             replayed=r.replayed)

    def Release(self, request: inventory_pb2.ReleaseRequest,
                context: grpc.ServicerContext) -> inventory_pb2.ReleaseResponse:
        r = _call(context, lambda: self.book.release(request.order_id))
        return inventory_pb2.ReleaseResponse(order_id=r.order_id, released=r.released,
                                             replayed=r.replayed)

    def GetStock(self, request: inventory_pb2.GetStockRequest,
                 context: grpc.ServicerContext) -> inventory_pb2.GetStockResponse:
        s = _call(context, lambda: self.book.stock(request.sku))
        return inventory_pb2.GetStockResponse(stock=_stock_pb(s))

    def ListReservations(self, request: inventory_pb2.ListReservationsRequest,
                         context: grpc.ServicerContext
                         ) -> inventory_pb2.ListReservationsResponse:
        rows = _call(context, lambda: self.book.reservations(request.order_id))
        return inventory_pb2.ListReservationsResponse(reservations=[
            inventory_pb2.Reservation(order_id=r.order_id, sku=r.sku, quantity=r.quantity,
                                      state=r.state) for r in rows])

    def Summary(self, request: inventory_pb2.SummaryRequest,
                context: grpc.ServicerContext) -> inventory_pb2.SummaryResponse:
        levels = _call(context, self.book.summary)
        return inventory_pb2.SummaryResponse(stock=[_stock_pb(s) for s in levels])


def spec(instance: str, db_path: str | Path) -> ServiceSpec:
    """The replica's ServiceSpec: the schema and seed are ensured at start
    (``StockBook.init``)."""
    book = StockBook(db_path)
    return ServiceSpec(
        name="inventory", instance=instance, grpc_services=(SERVICE_NAME,),
        add_servicers=lambda server: inventory_pb2_grpc.add_InventoryServicer_to_server(
            InventoryServicer(book), server),
        on_start=book.init)
