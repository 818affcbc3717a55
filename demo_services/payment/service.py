"""The ``payment.Payment`` servicer: a thin gRPC face on ``Ledger``.

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
from protos.payment import payment_pb2, payment_pb2_grpc

from .ledger import Ledger

SERVICE_NAME = payment_pb2.DESCRIPTOR.services_by_name["Payment"].full_name  # payment.Payment
T = TypeVar("T")


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    return answer(context, fn, "payment")


class PaymentServicer(payment_pb2_grpc.PaymentServicer):
    """``payment.Payment`` over one ``Ledger`` (the replica's view of the shared file)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def Charge(self, request: payment_pb2.ChargeRequest,
               context: grpc.ServicerContext) -> payment_pb2.ChargeResponse:
        r = _call(context, lambda: self.ledger.charge(request.order_id, request.customer,
                                                      request.amount_cents))
        return payment_pb2.ChargeResponse(order_id=r.order_id, charged=r.charged,
                                          amount_cents=r.amount_cents, replayed=r.replayed)

    def Refund(self, request: payment_pb2.RefundRequest,
               context: grpc.ServicerContext) -> payment_pb2.RefundResponse:
        r = _call(context, lambda: self.ledger.refund(request.order_id))
        return payment_pb2.RefundResponse(order_id=r.order_id, refunded=r.refunded,
                                          amount_cents=r.amount_cents, replayed=r.replayed)

    def GetBalance(self, request: payment_pb2.GetBalanceRequest,
                   context: grpc.ServicerContext) -> payment_pb2.GetBalanceResponse:
        balance = _call(context, lambda: self.ledger.balance(request.customer))
        return payment_pb2.GetBalanceResponse(customer=request.customer, balance_cents=balance)

    def ListLedger(self, request: payment_pb2.ListLedgerRequest,
                   context: grpc.ServicerContext) -> payment_pb2.ListLedgerResponse:
        entries = _call(context, lambda: self.ledger.ledger(request.order_id, request.customer))
        return payment_pb2.ListLedgerResponse(entries=[
            payment_pb2.LedgerEntry(id=e.id, order_id=e.order_id, customer=e.customer,
                                    kind=e.kind, amount_cents=e.amount_cents, at_unix=e.at_unix)
            for e in entries])

    def Summary(self, request: payment_pb2.SummaryRequest,
                context: grpc.ServicerContext) -> payment_pb2.SummaryResponse:
        s = _call(context, self.ledger.summary)
        return payment_pb2.SummaryResponse(
            opening_total_cents=s.opening_total_cents,
            balances_total_cents=s.balances_total_cents,
            merchant_takings_cents=s.merchant_takings_cents, customers=s.customers)


def spec(instance: str, db_path: str | Path) -> ServiceSpec:
    """The replica's ServiceSpec: the schema and seed are ensured at start (``Ledger.init``)."""
    ledger = Ledger(db_path)
    return ServiceSpec(
        name="payment", instance=instance, grpc_services=(SERVICE_NAME,),
        add_servicers=lambda server: payment_pb2_grpc.add_PaymentServicer_to_server(
            PaymentServicer(ledger), server),
        on_start=ledger.init)
