"""The open loop: sends CreateOrder at a fixed rate whatever the answers' latency, bounded by
a number of calls in flight (a send over the bound is dropped and counted), pausable; a
poller follows orders answered PENDING with GetOrder until they are terminal."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from protos.order import order_pb2, order_pb2_grpc

from .mix import Mix, Planned
from .tally import Tally

log = logging.getLogger("demo.loadgen")

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                         grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})
MAX_ATTEMPTS = 4
POLL_INTERVAL_S = 1.0
POLL_BATCH = 20
MAX_LAG_S = 1.0


class LoadGenerator:
    """Drives ``mix`` at ``rps`` against the Order service on ``channel``."""

    def __init__(self, channel: grpc.Channel | None, rps: float, mix: Mix, tally: Tally, *,
                 deadline_s: float = 5.0, max_in_flight: int = 64, paused: bool = False,
                 clock: Callable[[], float] = time.monotonic, stub: Any = None) -> None:
        """``stub``: instead of ``channel``, an object with OrderStub's ``CreateOrder``
        (and ``.future``) and ``GetOrder`` (e.g. via_gateway.GatewayOrderClient)."""
        self.stub = stub if stub is not None else order_pb2_grpc.OrderStub(channel)
        self.rps = rps
        self.mix = mix
        self.tally = tally
        self.deadline_s = deadline_s
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.stopping = threading.Event()
        self._paused = paused
        self._mix_lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._send_loop, name="send", daemon=True),
                         threading.Thread(target=self._poll_loop, name="poll", daemon=True)]

    # -- control -------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """No new sends from now on (calls in flight finish; pending orders are polled)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, wait_s: float) -> None:
        """Stop sending and wait up to ``wait_s`` for the calls in flight."""
        self.stopping.set()
        deadline = self.clock() + wait_s
        while self.tally.in_flight > 0 and self.clock() < deadline:
            time.sleep(0.05)

    # -- sending -------------------------------------------------------------------------
    def _send_loop(self) -> None:
        interval = 1.0 / self.rps if self.rps > 0 else 0.0
        next_due = self.clock()
        while not self.stopping.is_set():
            now = self.clock()
            if self._paused or interval == 0.0:
                next_due = now + interval
                self.stopping.wait(0.05)
                continue
            if now < next_due:
                self.stopping.wait(min(next_due - now, 0.05))
                continue
            next_due = max(next_due + interval, now - MAX_LAG_S)  # no burst after a stall
            with self._mix_lock:
                sends = self.mix.next()
            for planned in sends:
                self._send(planned)

    def _send(self, planned: Planned) -> None:
        if self.tally.in_flight >= self.max_in_flight:
            self.tally.on_drop()
            return
        req = order_pb2.CreateOrderRequest(
            request_id=planned.request_id, customer=planned.customer,
            items=[order_pb2.Item(sku=s, quantity=q) for s, q in planned.items])
        self.tally.on_send(planned.resend, self.clock())
        try:
            fut = self.stub.CreateOrder.future(req, timeout=self.deadline_s)
        except Exception as exc:  # a closed channel: count it as a failed call
            log.warning("cannot send: %s", exc)
            self.tally.on_error("CLIENT")
            return
        fut.add_done_callback(lambda f: self._done(planned, f))

    def _done(self, planned: Planned, fut: grpc.Future) -> None:
        try:
            view = fut.result()
        except grpc.FutureCancelledError:
            self.tally.on_error("CANCELLED")
            return
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            self.tally.on_error(code.name)
            rid = planned.request_id
            with self._mix_lock:
                attempts = self._attempts.get(rid, 1)
                if code in RETRY_CODES and attempts < MAX_ATTEMPTS:
                    self._attempts[rid] = attempts + 1
                    self.mix.again(planned)
                else:
                    self._attempts.pop(rid, None)
            return
        with self._mix_lock:
            self._attempts.pop(planned.request_id, None)
        self.tally.on_answer(planned.request_id, view.order_id, view.state, view.reason)

    # -- following pending orders ----------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self.stopping.wait(POLL_INTERVAL_S):
            for rid, order_id in list(self.tally.pending().items())[:POLL_BATCH]:
                if self.stopping.is_set():
                    return
                try:
                    view = self.stub.GetOrder(order_pb2.GetOrderRequest(order_id=order_id),
                                              timeout=2.0)
                except grpc.RpcError:
                    continue
                self.tally.on_answer(rid, view.order_id, view.state, view.reason,
                                     call_done=False)
