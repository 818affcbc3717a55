"""Admin.Tap against a real control plane: the test speaks the Discovery stream protocol
itself, as sidecars do (joined with a token, over mTLS), so it sees the TapStart and TapStop
the control plane sends and chooses the TapEvents the sidecars send back."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.integration.test_control_plane import (
    ControlPlaneProc,
    Workload,
    admin_channel,
    join,
    mtls_channel,
    rpc_error,
    start_cp,
)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("cp-tap")
    c = start_cp(base / "ca", base / "data", "--otlp-listen", "", "--admin-http", "127.0.0.1:0")
    yield c
    assert c.proc.stop() == 0, c.proc.log_tail()


@pytest.fixture(scope="module")
def admin(cp: ControlPlaneProc) -> Iterator[pb_grpc.AdminStub]:
    with admin_channel(cp) as ch:
        yield pb_grpc.AdminStub(ch)


class StreamClient:
    """One sidecar's discovery stream, driven by the test: ``send`` queues a SidecarMessage;
    what the control plane sends lands in ``received``."""

    def __init__(self, cp: ControlPlaneProc, admin: pb_grpc.AdminStub, service: str,
                 instance: str, *, inbound: str = "", outbound: str = "") -> None:
        self.instance = instance
        self.workload = Workload()
        token = admin.CreateToken(pb.CreateTokenRequest(service=service, uses=1),
                                  timeout=5).token
        join(token, self.workload, csr_service=service, instance=instance)
        self.channel = mtls_channel(cp, self.workload)
        self._out: queue.Queue[pb.SidecarMessage | None] = queue.Queue()
        self.received: queue.Queue[pb.ControlMessage] = queue.Queue()
        self.send(pb.SidecarMessage(register=pb.Register(
            instance_id=instance, inbound=inbound, outbound=outbound, admin="127.0.0.1:9")))
        self.call = pb_grpc.DiscoveryStub(self.channel).Stream(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"stream-{instance}")
        self._reader.start()

    def _requests(self) -> Iterator[pb.SidecarMessage]:
        while (msg := self._out.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.received.put(msg)
        except grpc.RpcError:
            pass

    def send(self, msg: pb.SidecarMessage) -> None:
        self._out.put(msg)

    def send_events(self, tap_id: str, *events: pb.TapEvent) -> None:
        self.send(pb.SidecarMessage(tap=pb.TapEvents(id=tap_id, events=list(events))))

    def next_of(self, kind: str, timeout_s: float = 10,
                match: Callable[[pb.ControlMessage], bool] = lambda m: True
                ) -> pb.ControlMessage:
        """The next message of ``kind`` (``tap_start``, ``tap_stop``, ...) that ``match``es;
        others are skipped. Fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.received.get(timeout=left)
            except queue.Empty:
                break
            if msg.WhichOneof("msg") == kind and match(msg):
                return msg
        raise AssertionError(f"{self.instance}: no {kind} within {timeout_s} s")

    def none_of(self, kind: str, wait_s: float) -> bool:
        """True when no ``kind`` message arrives within ``wait_s`` (a negative check)."""
        try:
            self.next_of(kind, wait_s)
        except AssertionError:
            return True
        return False

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self.channel.close()


class TapReader:
    """An Admin.Tap call read in a thread: events land in ``events``; ``done`` is set when
    the stream ends (``error`` then holds its RpcError, if any)."""

    def __init__(self, admin: pb_grpc.AdminStub, request: pb.TapRequest) -> None:
        self.call = admin.Tap(request, timeout=60)
        self.events: queue.Queue[pb.TapEvent] = queue.Queue()
        self.done = threading.Event()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True, name="tap-reader").start()

    def _read(self) -> None:
        try:
            for ev in self.call:
                self.events.put(ev)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def take(self, n: int, timeout_s: float = 10) -> list[pb.TapEvent]:
        out = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(out)} of {n} tap events: {out}")
            try:
                out.append(self.events.get(timeout=left))
            except queue.Empty:
                continue
        return out


def call(direction: str, source: str, destination: str, method: str = "/payment.Payment/Charge",
         status: str = "OK") -> pb.TapEvent:
    return pb.TapEvent(time_unix=time.time(), instance="whoever", direction=direction,
                       source=source, destination=destination, method=method, status=status,
                       latency_ms=3.0, attempts=1)


@pytest.fixture(scope="module")
def sidecars(cp: ControlPlaneProc, admin: pb_grpc.AdminStub) -> Iterator[dict[str, StreamClient]]:
    clients = {
        "payment-1": StreamClient(cp, admin, "payment", "payment-1", inbound="127.0.0.1:7001"),
        "order-1": StreamClient(cp, admin, "order", "order-1", inbound="127.0.0.1:7002",
                                outbound="127.0.0.1:7003"),
        "inventory-1": StreamClient(cp, admin, "inventory", "inventory-1",
                                    inbound="127.0.0.1:7004"),
    }
    for c in clients.values():
        c.next_of("snapshot")  # registered and served
    yield clients
    for c in clients.values():
        c.close()


def test_a_tap_starts_on_the_services_sidecars_and_callers_streams_their_calls_and_stops(
        cp: ControlPlaneProc, admin: pb_grpc.AdminStub,
        sidecars: dict[str, StreamClient]) -> None:
    payment, order, inventory = (sidecars[k] for k in ("payment-1", "order-1", "inventory-1"))
    tap = TapReader(admin, pb.TapRequest(service="payment", method="/payment.Payment/",
                                         duration_s=30))
    start = payment.next_of("tap_start").tap_start
    assert start.method == "/payment.Payment/" and 0 < start.duration_s <= 30
    assert start.max_events_per_s > 0
    assert order.next_of("tap_start").tap_start.id == start.id  # it may call payment
    assert inventory.none_of("tap_start", 0.5)  # it cannot: inbound only, another service

    payment.send_events(start.id, call("inbound", "order", "payment"))
    order.send_events(start.id, call("outbound", "order", "inventory",
                                     "/inventory.Inventory/Reserve"),
                      call("outbound", "order", "payment", status="UNAVAILABLE"))
    got = tap.take(2)
    assert sorted((e.instance, e.direction, e.status) for e in got) == [
        ("order-1", "outbound", "UNAVAILABLE"), ("payment-1", "inbound", "OK")]

    # a sidecar that connects while the tap runs is asked too, for the time left
    late = StreamClient(cp, admin, "payment", "payment-2", inbound="127.0.0.1:7005")
    try:
        late_start = late.next_of("tap_start").tap_start
        assert late_start.id == start.id and late_start.duration_s < 30
        late.send_events(start.id, call("inbound", "gateway", "payment", "/payment.Payment/Refund"))
        (ev,) = tap.take(1)
        assert (ev.instance, ev.method, ev.source) == \
            ("payment-2", "/payment.Payment/Refund", "gateway")

        tap.call.cancel()
        for c in (payment, order, late):
            assert c.next_of("tap_stop", match=lambda m: m.tap_stop.id == start.id)
    finally:
        late.close()
    assert tap.done.wait(5)
    assert tap.error is not None and tap.error.code() == grpc.StatusCode.CANCELLED


def test_a_tap_ends_after_max_events_and_stops_its_sidecars(
        admin: pb_grpc.AdminStub, sidecars: dict[str, StreamClient]) -> None:
    payment = sidecars["payment-1"]
    tap = TapReader(admin, pb.TapRequest(service="payment", max_events=2, duration_s=30))
    tap_id = payment.next_of("tap_start").tap_start.id
    payment.send_events(tap_id, *[call("inbound", "order", "payment")] * 3)
    assert len(tap.take(2)) == 2
    assert tap.done.wait(5) and tap.error is None  # ended by itself, OK
    assert tap.events.empty()
    assert payment.next_of("tap_stop", match=lambda m: m.tap_stop.id == tap_id)


def test_a_tap_ends_at_its_duration(admin: pb_grpc.AdminStub,
                                    sidecars: dict[str, StreamClient]) -> None:
    payment = sidecars["payment-1"]
    t0 = time.monotonic()
    tap = TapReader(admin, pb.TapRequest(service="payment", duration_s=1))
    tap_id = payment.next_of("tap_start").tap_start.id
    assert tap.done.wait(10) and tap.error is None
    assert 0.8 <= time.monotonic() - t0 < 8
    assert payment.next_of("tap_stop", match=lambda m: m.tap_stop.id == tap_id)


def test_bad_tap_requests_and_workload_callers_are_refused(
        cp: ControlPlaneProc, admin: pb_grpc.AdminStub,
        sidecars: dict[str, StreamClient]) -> None:
    for req, field in [(pb.TapRequest(), "service"),
                       (pb.TapRequest(service="payment", method="Charge"), "method"),
                       (pb.TapRequest(service="payment", duration_s=-1), "duration_s"),
                       (pb.TapRequest(service="payment", max_events=-5), "max_events")]:
        err = rpc_error(lambda req=req: list(admin.Tap(req, timeout=5)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
    workload = pb_grpc.AdminStub(sidecars["payment-1"].channel)
    err = rpc_error(lambda: list(workload.Tap(pb.TapRequest(service="payment"), timeout=5)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
