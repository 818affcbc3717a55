"""The call log, sans-IO: the access log's line shape and buffering (fake timer, fake
sink), the taps' matching, expiry and rate bound (fake clock), the discovery side of taps
(``TapStart``/``TapStop`` handled, ``TapEvents`` built), and one discovery session on
loopback against an in-process fake control plane that taps the sidecar."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from mesh_common.snapshot import Endpoint, Snapshot
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from sidecar.discovery import DiscoveryClient, DiscoveryState, Registration, tap_message
from sidecar.http2 import grpc as G
from sidecar.layers.calllog import (
    DEFAULT_TAP_EVENTS_PER_S,
    MAX_PENDING_BYTES,
    MAX_TAPS,
    AccessLog,
    CallLog,
    TapBatch,
    TapRecord,
    Taps,
    rfc3339_ms,
)
from sidecar.layers.stats import StatsReport
from sidecar.rpc import Channel

TD = "mesh.local"
UNARY = "/meshtest.Echo/Unary"
WALL = 1_714_564_800.0  # 2024-05-01T12:00:00Z
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Timers:
    """A fake ``call_later``: timers fire when the test says so."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, Callable[[], None], Any]] = []

    def __call__(self, delay_s: float, fn: Callable[[], None]) -> Any:
        handle = SimpleNamespace(cancelled=False)
        handle.cancel = lambda: setattr(handle, "cancelled", True)
        self.armed.append((delay_s, fn, handle))
        return handle

    def fire(self) -> None:
        armed, self.armed = self.armed, []
        for _, fn, handle in armed:
            if not handle.cancelled:
                fn()


def call(path: str = UNARY, *, route: str = "echo", status: int | None = G.OK,
         started_s: float = 99.995, peer: str | None = None, attempts: int = 1,
         endpoint: Endpoint | None = None, notes: list[str] | None = None,
         trace_id: str = "") -> Any:
    return SimpleNamespace(path=path, route=route, grpc_status=status, started_s=started_s,
                           ended_s=None, peer_id=peer, attempts=attempts, endpoint=endpoint,
                           notes=notes, trace_id=trace_id)


ECHO_1 = Endpoint("127.0.0.1", 16006, f"spiffe://{TD}/service/echo", "echo-1")


# ---------------------------------------------------------------------- access log
def test_rfc3339_times_are_utc_with_milliseconds() -> None:
    assert rfc3339_ms(WALL) == "2024-05-01T12:00:00.000Z"
    assert rfc3339_ms(WALL + 1.2345) == "2024-05-01T12:00:01.234Z"
    assert rfc3339_ms(WALL + 59.9999) == "2024-05-01T12:00:59.999Z"


def test_an_outbound_line_carries_every_field_of_the_call() -> None:
    clock = Clock()
    lines: list[bytes] = []
    timers = Timers()
    log = AccessLog(lines.append, timers)
    layer = CallLog("outbound", "web", Taps(clock), log, clock=clock,
                    wall_clock=lambda: WALL + 0.25)
    layer.on_end(call(attempts=2, endpoint=ECHO_1, trace_id="ab" * 16,
                      notes=["retry 1 of 2 after UNAVAILABLE from 127.0.0.1:16005",
                             "outlier detection: ejected 127.0.0.1:16005"]))
    layer.on_end(call(path="/x.Y/Z", route="", status=None, attempts=0))
    assert lines == []  # buffered
    timers.fire()
    [data] = lines
    first, second = [json.loads(x) for x in data.decode().splitlines()]
    assert first == {"time": "2024-05-01T12:00:00.250Z", "direction": "outbound",
                     "source": "web", "destination": "echo", "method": UNARY, "status": "OK",
                     "latency_ms": pytest.approx(5.0), "attempts": 2,
                     "endpoint": "127.0.0.1:16006", "trace_id": "ab" * 16,
                     "reason": "retry 1 of 2 after UNAVAILABLE from 127.0.0.1:16005; "
                               "outlier detection: ejected 127.0.0.1:16005", "peer": ""}
    assert (second["destination"], second["status"], second["attempts"], second["endpoint"],
            second["reason"]) == ("", "RESET", 0, "", "")
    assert RFC3339_MS.match(second["time"])


def test_an_inbound_line_names_the_caller_by_service_and_spiffe_id() -> None:
    clock = Clock()
    lines: list[bytes] = []
    layer = CallLog("inbound", "echo", Taps(clock), AccessLog(lines.append, Timers()),
                    clock=clock, wall_clock=lambda: WALL)
    assert layer.access_log is not None
    layer.on_end(call(route="", peer=f"spiffe://{TD}/service/web", status=G.UNIMPLEMENTED))
    layer.on_end(call(route="", peer=None))
    layer.access_log.flush()
    a, b = [json.loads(x) for x in lines[0].decode().splitlines()]
    assert (a["direction"], a["source"], a["destination"], a["peer"], a["status"]) == (
        "inbound", "web", "echo", f"spiffe://{TD}/service/web", "UNIMPLEMENTED")
    assert (b["source"], b["peer"]) == ("", "")


def test_lines_are_written_in_one_write_per_tick_or_per_64_kib_and_at_close() -> None:
    writes: list[bytes] = []
    timers = Timers()
    closed: list[bool] = []
    log = AccessLog(writes.append, timers, close=lambda: closed.append(True))
    line = json.dumps({"x": "y" * 200}) + "\n"
    for _ in range(10):
        log.add(line)
    assert writes == [] and len(timers.armed) == 1  # one timer for the batch, not per line
    timers.fire()
    assert len(writes) == 1 and writes[0].count(b"\n") == 10
    n = MAX_PENDING_BYTES // len(line) + 1
    for _ in range(n):  # crosses 64 KiB: written at once, without waiting for the timer
        log.add(line)
    assert len(writes) == 2 and writes[1].count(b"\n") == n
    log.add(line)
    log.close()
    assert len(writes) == 3 and closed == [True]
    log.add(line)  # after close: ignored
    timers.fire()
    assert len(writes) == 3
    assert log.stats()["lines"] == 11 + n


def test_a_failed_write_loses_its_lines_and_the_log_keeps_going() -> None:
    ok: list[bytes] = []
    fail = [True]

    def write(data: bytes) -> None:
        if fail[0]:
            raise OSError(28, "No space left on device")
        ok.append(data)
    log = AccessLog(write, Timers())
    log.add("a\n")
    log.flush()
    fail[0] = False
    log.add("b\n")
    log.flush()
    assert ok == [b"b\n"] and log.lost_lines == 1


def test_the_file_sink_appends(tmp_path: Any) -> None:
    path = tmp_path / "access.log"
    path.write_text("old\n")
    log = AccessLog.open(str(path), Timers())
    log.add("new\n")
    log.close()
    assert path.read_text() == "old\nnew\n"


# ---------------------------------------------------------------------- taps
def record(path: str = UNARY) -> TapRecord:
    return TapRecord(WALL, "outbound", "web", "echo", path, "OK", 1.0, 1, "", "", "")


def test_no_tap_no_log_costs_nothing_per_call() -> None:
    layer = CallLog("outbound", "web", Taps(Clock()))
    layer.on_end(SimpleNamespace(path=UNARY))  # type: ignore[arg-type]  # nothing else read


def test_taps_take_every_method_an_exact_one_or_a_prefix() -> None:
    clock = Clock()
    taps = Taps(clock)
    taps.start("all", "", 10)
    taps.start("exact", UNARY, 10)
    taps.start("prefix", "/meshtest.Echo/", 10)
    built = []

    def make(path: str) -> Callable[[], TapRecord]:
        def build() -> TapRecord:
            built.append(path)
            return record(path)
        return build
    for path in (UNARY, "/meshtest.Echo/Bidi", "/other.S/M", "/meshtest.Echo/UnaryX"):
        taps.offer(path, make(path))
    got = {b.id: [e.method for e in b.events] for b in taps.take()}
    assert got == {"all": [UNARY, "/meshtest.Echo/Bidi", "/other.S/M", "/meshtest.Echo/UnaryX"],
                   "exact": [UNARY],
                   "prefix": [UNARY, "/meshtest.Echo/Bidi", "/meshtest.Echo/UnaryX"]}
    assert len(built) == 4  # one record per call, whatever the number of taps
    assert taps.take() == []  # nothing new


def test_a_tap_ends_at_its_duration_and_its_last_events_still_go_out() -> None:
    clock = Clock()
    taps = Taps(clock)
    taps.start("t", "", 2.0)
    taps.offer(UNARY, record)
    clock.now += 1.9
    taps.offer(UNARY, record)
    clock.now += 0.2  # past its duration
    assert taps.active  # until someone looks
    [batch] = taps.take()
    assert (batch.id, len(batch.events)) == ("t", 2)
    assert not taps.active and not taps.pending()
    taps.offer(UNARY, record)
    assert taps.take() == []


def test_a_tap_that_expires_while_calls_end_stops_taking_them() -> None:
    clock = Clock()
    taps = Taps(clock)
    taps.start("t", "", 1.0)
    taps.offer(UNARY, record)
    clock.now += 1.0
    taps.offer(UNARY, record)  # at expiry: ends it
    assert not taps.active and taps.pending()
    [batch] = taps.take()
    assert len(batch.events) == 1


def test_a_tap_takes_at_most_its_rate_and_counts_the_rest_as_dropped() -> None:
    clock = Clock()
    taps = Taps(clock)
    taps.start("slow", "", 60, max_events_per_s=5)
    taps.start("default", "", 60)  # 0: the default rate
    for _ in range(150):
        taps.offer(UNARY, record)
        clock.now += 0.001
    got = {b.id: (len(b.events), b.dropped) for b in taps.take()}
    assert got == {"slow": (5, 145), "default": (DEFAULT_TAP_EVENTS_PER_S, 50)}
    clock.now += 1.0  # a new second: a new allowance, and dropped starts over
    for _ in range(7):
        taps.offer(UNARY, record)
    got = {b.id: (len(b.events), b.dropped) for b in taps.take()}
    assert got == {"slow": (5, 2), "default": (7, 0)}


def test_stop_replace_clear_and_the_bound_on_taps() -> None:
    clock = Clock()
    taps = Taps(clock)
    taps.start("a", "", 60)
    taps.offer(UNARY, record)
    assert taps.stop("a") and not taps.stop("a") and not taps.stop("never")
    assert not taps.active and taps.pending()
    assert [len(b.events) for b in taps.take()] == [1]
    taps.start("b", "", 60)
    taps.offer(UNARY, record)
    taps.start("b", "/x.Y/", 60)  # same id: replaced (what it took still goes out)
    taps.offer(UNARY, record)
    assert [(b.id, len(b.events)) for b in taps.take()] == [("b", 1)]
    taps.start("c", "", float("nan"))  # nonsense duration: the default, not forever
    assert taps.active["c"].expires_s == pytest.approx(clock.now + 60)
    taps.clear()
    assert not taps.active and taps.take() == []
    assert all(taps.start(f"t{i}", "", 60) for i in range(MAX_TAPS))
    assert not taps.start("one-too-many", "", 60)
    assert len(taps.active) == MAX_TAPS


def test_the_layer_feeds_taps_with_the_calls_record_both_ways() -> None:
    clock = Clock()
    taps = Taps(clock)
    out = CallLog("outbound", "web", taps, clock=clock, wall_clock=lambda: WALL)
    inb = CallLog("inbound", "web", taps, clock=clock, wall_clock=lambda: WALL)
    out.on_end(call())  # no tap yet
    taps.start("t", "", 10)
    out.on_end(call(endpoint=ECHO_1, notes=["fast-fail"], status=G.UNAVAILABLE))
    inb.on_end(call("/web.Web/Get", route="", peer=f"spiffe://{TD}/service/gateway"))
    [batch] = taps.take()
    a, b = batch.events
    assert a == TapRecord(WALL, "outbound", "web", "echo", UNARY, "UNAVAILABLE",
                          pytest.approx(5.0), 1, "127.0.0.1:16006", "", "fast-fail")
    assert (b.direction, b.source, b.destination, b.method, b.endpoint) == (
        "inbound", "gateway", "web", "/web.Web/Get", "")


# ---------------------------------------------------------------------- discovery's side
def _state(taps: Taps) -> DiscoveryState:
    snap = Snapshot("static")
    return DiscoveryState(snap, TD, current=lambda: snap, apply=lambda s: None,
                          renew=lambda: None, taps=taps)


def test_tap_start_and_stop_from_the_control_plane_need_no_reply() -> None:
    clock = Clock()
    taps = Taps(clock)
    state = _state(taps)
    start = pb.ControlMessage(tap_start=pb.TapStart(id="t1", method="/meshtest.Echo/",
                                                    duration_s=5, max_events_per_s=3))
    assert state.handle(start) == []
    tap = taps.active["t1"]
    assert (tap.prefix, tap.expires_s, tap.max_per_s) == ("/meshtest.Echo/", clock.now + 5, 3)
    assert state.handle(pb.ControlMessage(tap_stop=pb.TapStop(id="t1"))) == []
    assert not taps.active
    # A sidecar without taps ignores them.
    snap = Snapshot("static")
    plain = DiscoveryState(snap, TD, current=lambda: snap, apply=lambda s: None,
                           renew=lambda: None)
    assert plain.handle(start) == []


def test_tap_events_carry_the_instance_and_every_field() -> None:
    rec = TapRecord(WALL, "outbound", "web", "echo", UNARY, "OK", 2.5, 2, "127.0.0.1:1",
                    "cd" * 16, "retried")
    msg = tap_message(TapBatch("t1", [rec], 4), "web-1")
    assert msg.WhichOneof("msg") == "tap"
    assert (msg.tap.id, msg.tap.dropped, len(msg.tap.events)) == ("t1", 4, 1)
    ev = msg.tap.events[0]
    assert (ev.time_unix, ev.instance, ev.direction, ev.source, ev.destination, ev.method,
            ev.status, ev.latency_ms, ev.attempts, ev.endpoint, ev.trace_id, ev.reason) == (
        WALL, "web-1", "outbound", "web", "echo", UNARY, "OK", 2.5, 2, "127.0.0.1:1",
        "cd" * 16, "retried")


class TappingControlPlane(pb_grpc.DiscoveryServicer):
    """On the first stream: starts a tap after Register, records the TapEvents and ends the
    stream (without TapStop) once it has seen ``want`` events. Later streams: nothing."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.events: list[pb.TapEvent] = []
        self.batches = 0
        self.streams = 0
        self.ended = asyncio.Event()

    async def Stream(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        self.streams += 1
        first = self.streams == 1
        async for msg in request_iterator:
            kind = msg.WhichOneof("msg")
            if kind == "register" and first:
                yield pb.ControlMessage(tap_start=pb.TapStart(id="t", method=UNARY,
                                                              duration_s=30))
            elif kind == "tap":
                self.batches += 1
                self.events.extend(msg.tap.events)
                if len(self.events) >= self.want:
                    break
        if first:
            self.ended.set()


async def test_a_tap_over_the_discovery_stream_sends_batches_and_ends_with_the_stream() -> None:
    server = grpc.aio.server()
    cp = TappingControlPlane(want=10)
    pb_grpc.add_DiscoveryServicer_to_server(cp, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    taps = Taps()
    layer = CallLog("outbound", "web", taps)
    client = DiscoveryClient(
        _state(taps), Registration("web-1", outbound="127.0.0.1:1", admin="127.0.0.1:2"),
        addresses=[f"127.0.0.1:{port}"], channel=Channel,
        take_report=lambda: StatsReport(0.05, {}, {}), health=lambda: "",
        cert_not_after_unix=lambda: 0, report_interval_s=0.05, max_backoff_s=5)
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(10):
            while not taps.active:
                await asyncio.sleep(0.01)
            for _ in range(10):  # ten taken calls end at once, and some it does not take
                layer.on_end(call(started_s=taps.clock() - 0.002))
                layer.on_end(call("/meshtest.Echo/Other", started_s=taps.clock()))
            await cp.ended.wait()  # the control plane hangs up once it has them all
            while taps.active:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
    assert len(cp.events) == 10 and {e.method for e in cp.events} == {UNARY}
    assert {e.instance for e in cp.events} == {"web-1"}
    assert all(e.direction == "outbound" and e.destination == "echo" and e.status == "OK"
               for e in cp.events)
    assert cp.batches == 1  # one TapEvents for calls that ended within 100 ms
    assert client.stats()["taps"]["active"] == []  # the tap ended with its stream


def test_an_access_log_that_cannot_be_written_is_one_line_and_exit_2(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.main import main
    bad = tmp_path / "no-such-dir" / "access.log"
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "unused.yaml"), "--access-log", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--access-log" in err and str(bad) in err
