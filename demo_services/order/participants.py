"""The saga's participants: what the orchestrator asks of inventory and payment.

``Participants`` is the interface; ``GrpcParticipants`` calls ``inventory.Inventory`` and
``payment.Payment`` through the replica's own sidecar (``outbound_channel``) with a per-call
timeout (or, with ``channels_to``, straight to the participants' addresses, without the
mesh: the same calls). Every method returns the step's answer or raises ``ParticipantError`` carrying the
gRPC status and its saga classification (``saga.classify``). Implementations may also raise
``BusinessError`` (in-process logic); the runner classifies both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import grpc

from demo_services.common.mesh import direct_channel, outbound_channel
from protos.inventory import inventory_pb2, inventory_pb2_grpc
from protos.payment import payment_pb2, payment_pb2_grpc

from .saga import Outcome, classify


class ParticipantError(Exception):
    """A participant call that did not succeed: ``code`` its gRPC status, ``outcome`` the
    saga's reading of it (BUSINESS: not applied, compensate; TRANSIENT: may have applied,
    retry)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.outcome: Outcome = classify(code)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ParticipantError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


class Participants(Protocol):
    """Inventory and payment as the saga sees them. Every call is idempotent by
    (order id, step) on the participant's side; each raises ParticipantError (or
    BusinessError) when it does not succeed."""

    def reserve(self, order_id: str, items: Sequence[tuple[str, int]]) -> None:
        """Reserve every item (all or nothing)."""
        ...

    def release(self, order_id: str) -> bool:
        """Give the order's stock back; False if nothing was reserved (then recorded, so a
        late Reserve is refused)."""
        ...

    def charge(self, order_id: str, customer: str, amount_cents: int) -> int:
        """Charge the customer; returns the amount charged in cents."""
        ...

    def refund(self, order_id: str) -> int:
        """Refund the order's charge; returns the cents given back (0: nothing was charged,
        then recorded, so a late Charge is refused)."""
        ...


def channels_to(direct: Mapping[str, Sequence[str]]) -> Callable[[str, str], grpc.Channel]:
    """A ``channel_factory`` for ``GrpcParticipants``: a service named in ``direct``
    (service -> its replicas' HOST:PORT) is called straight at those addresses
    (``direct_channel``, no sidecar), any other through the sidecar's outbound port."""
    addresses = {service: tuple(addrs) for service, addrs in direct.items()}

    def factory(outbound: str, service: str) -> grpc.Channel:
        if service in addresses:
            return direct_channel(addresses[service], service)
        return outbound_channel(outbound, service)

    return factory


class GrpcParticipants:
    """``Participants`` over gRPC through the replica's sidecar at ``outbound`` (HOST:PORT),
    each call bounded by ``call_timeout_s`` (DEADLINE_EXCEEDED past it: transient). Channels
    are opened on first use and shared by threads; ``close()`` closes them."""

    def __init__(self, outbound: str, call_timeout_s: float = 2.0,
                 channel_factory: Callable[[str, str], grpc.Channel] = outbound_channel) -> None:
        self.outbound = outbound
        self.call_timeout_s = call_timeout_s
        self._factory = channel_factory
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._inventory: inventory_pb2_grpc.InventoryStub | None = None
        self._payment: payment_pb2_grpc.PaymentStub | None = None

    def _channel(self, service: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(service)
            if ch is None:
                ch = self._channels[service] = self._factory(self.outbound, service)
            return ch

    @property
    def inventory(self) -> inventory_pb2_grpc.InventoryStub:
        if self._inventory is None:
            self._inventory = inventory_pb2_grpc.InventoryStub(self._channel("inventory"))
        return self._inventory

    @property
    def payment(self) -> payment_pb2_grpc.PaymentStub:
        if self._payment is None:
            self._payment = payment_pb2_grpc.PaymentStub(self._channel("payment"))
        return self._payment

    def reserve(self, order_id: str, items: Sequence[tuple[str, int]]) -> None:
        req = inventory_pb2.ReserveRequest(
            order_id=order_id,
            items=[inventory_pb2.Item(sku=s, quantity=q) for s, q in items])
        try:
            self.inventory.Reserve(req, timeout=self.call_timeout_s)
        except grpc.RpcError as err:
            raise ParticipantError.from_rpc(err) from None

    def release(self, order_id: str) -> bool:
        try:
            resp = self.inventory.Release(inventory_pb2.ReleaseRequest(order_id=order_id),
                                          timeout=self.call_timeout_s)
        except grpc.RpcError as err:
            raise ParticipantError.from_rpc(err) from None
        return bool(resp.released)

    def charge(self, order_id: str, customer: str, amount_cents: int) -> int:
        req = payment_pb2.ChargeRequest(order_id=order_id, customer=customer,
                                        amount_cents=amount_cents)
        try:
            resp = self.payment.Charge(req, timeout=self.call_timeout_s)
        except grpc.RpcError as err:
            raise ParticipantError.from_rpc(err) from None
        return int(resp.amount_cents)

    def refund(self, order_id: str) -> int:
        try:
            resp = self.payment.Refund(payment_pb2.RefundRequest(order_id=order_id),
                                       timeout=self.call_timeout_s)
        except grpc.RpcError as err:
            raise ParticipantError.from_rpc(err) from None
        return int(resp.amount_cents) if resp.refunded else 0

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            self._inventory = self._payment = None
        for ch in channels:
            ch.close()
