"""``python -m bench.cold [--calls N] [--evict-mib M] [--stack bare|outbound|inbound] [--json FILE]``

The relay's per-call work run cold, in one process, with no sockets, no TLS and no other
process: a caller core, the sidecar's relay (with the sidecar's own outbound or inbound layer
stack, or none) and a backend core, wired in memory. Each unary call (64-byte message) is
timed in its two traversals, the way a sidecar meets them: ``down_received`` (the request's
HEADERS and DATA arrive, the call is decided and sent upstream) and ``up_received`` (the
response's HEADERS, DATA and trailers arrive and go back down, and the call ends). Before
each timed traversal the caches are evicted (a copy of ``--evict-mib`` MiB), as they are for
a sidecar that slept 5 ms between calls at 200 rps while other processes ran; the same calls
are then timed warm, one after another. The figures (µs, medians and quartiles) are the
relay's own Python work: what ``bench.floor`` shows the mesh spends over a byte pipe, without
the machine's scheduling noise. A few single operations timed the same way calibrate the
machine's cold cost (what one cold ``hash()`` or one new object costs).
"""

from __future__ import annotations

import json
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stacks import sidecar_stacks
from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.limits import Limits
from mesh_common.snapshot import Cluster, Endpoint, Snapshot
from sidecar.http2.connection import H2Connection
from sidecar.http2.events import HeadersReceived
from sidecar.http2.headers import encode_block
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, Relay

PATH = "/meshtest.Echo/Unary"
SERVICE = "echo"
REQUEST = encode_block([(":method", "POST"), (":scheme", "http"), (":path", PATH),
                        (":authority", SERVICE), ("content-type", "application/grpc"),
                        ("te", "trailers")])
RESPONSE = encode_block([(":status", "200"), ("content-type", "application/grpc")])
TRAILERS = encode_block([("grpc-status", "0")])
MESSAGE = b"\0" + struct.pack(">L", 64) + b"x" * 64
STACKS = ("bare", "outbound", "inbound")


class _Timer:
    """``call_later``'s handle: timers never fire here (calls end long before)."""

    __slots__ = ()

    def cancel(self) -> None:
        return None


class _Bare:
    """No layers: every call goes to the one pool."""

    def __init__(self, pool: Callable[[], Pool]) -> None:
        self.pool = pool

    def on_request(self, call: Call) -> Pool:
        return self.pool()

    def on_response(self, call: Call) -> None:
        return None

    def on_end(self, call: Call) -> None:
        return None


def _exchange(a: H2Connection, b: H2Connection) -> None:
    """Move bytes both ways until both are quiet (SETTINGS and their ACKs)."""
    for _ in range(10):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return
        if out_a:
            b.receive(out_a)
        if out_b:
            a.receive(out_b)


class Harness:
    """Caller → relay (downstream core, layers, pool) → upstream core → backend core."""

    def __init__(self, stack: str) -> None:
        self.limits = limits = Limits()
        self.relay = Relay(_Bare(lambda: self.pool), limits, time.monotonic,
                           lambda delay_s, fn: _Timer(), lambda conn: None)
        self.pool = Pool("echo|h2c", "127.0.0.1:15006 (echo)", 1, self._connect)
        self.up: H2Connection | None = None
        self._connects: list[Pool] = []
        self._first_request = self._first_answer = True
        self.backend = H2Connection(client=False, limits=limits)
        if stack != "bare":
            endpoint = Endpoint("127.0.0.1", 15006, f"spiffe://mesh.local/service/{SERVICE}")
            snapshot = Snapshot("1", clusters=(Cluster(SERVICE, (endpoint,)),))
            outbound, inbound = sidecar_stacks(snapshot, lambda label: self.pool, server=SERVICE)
            self.relay.hooks = outbound if stack == "outbound" else inbound
        self.caller = H2Connection(client=True, limits=limits)
        self.down = H2Connection(client=False, limits=limits)
        self.relay.adopt(self.down)
        self.caller.initiate()
        self.down.initiate()
        _exchange(self.caller, self.down)

    def _connect(self, pool: Pool) -> None:
        self._connects.append(pool)  # completed by ``connect``, as the I/O side would later

    def connect(self) -> None:
        """Complete the upstream connections the relay asked for (SETTINGS exchanged)."""
        while self._connects:
            self._open(self._connects.pop())

    def _open(self, pool: Pool) -> None:
        up = H2Connection(client=True, limits=self.limits)
        self.relay.adopt(up)
        up.initiate()
        self.backend.initiate()
        _exchange(up, self.backend)
        self.up = up
        self.relay.pool_connected(pool, up)

    def request(self) -> bytes:
        """The caller's next call: its HEADERS and DATA (END_STREAM), as one read."""
        first, self._first_request = self._first_request, False
        return unary_request(self.caller, first)

    def answer(self) -> bytes:
        """What the relay sent upstream reaches the backend; its whole answer, as one read."""
        assert self.up is not None
        backend = self.backend
        for ev in backend.receive(self.up.data_to_send()):
            if type(ev) is HeadersReceived and ev.first:
                sid = ev.stream_id
                first, self._first_answer = self._first_answer, False
                backend.send_headers(sid, TABLE_SIZE_0 + RESPONSE if first else RESPONSE, False)
                backend.send_data(sid, MESSAGE, False)
                backend.send_trailers(sid, TRAILERS)
        return backend.data_to_send()

    def deliver(self) -> str | None:
        """What the relay sent down reaches the caller: the call's grpc-status (or None)."""
        status = None
        for ev in self.caller.receive(self.down.data_to_send()):
            if type(ev) is HeadersReceived and not ev.first:
                status = ev.headers.fields.get("grpc-status")
        if self.up is not None:
            self.backend.receive(self.up.data_to_send())  # credit, if any
        return status


TABLE_SIZE_0 = b"\x20"
"""HPACK's dynamic table size update to 0: what a peer puts before its first header block
once it has our SETTINGS_HEADER_TABLE_SIZE of 0 (h2load and grpcio do), after which its
blocks are read from the scan cache."""


def unary_request(caller: H2Connection, first: bool = False) -> bytes:
    """A new call on ``caller`` (client role): its HEADERS and DATA (END_STREAM), as one read
    (``first``: the connection's first block, which takes the table to size 0)."""
    sid = caller.open_stream().id
    caller.send_headers(sid, TABLE_SIZE_0 + REQUEST if first else REQUEST, False)
    caller.send_data(sid, MESSAGE, True)
    return caller.data_to_send()


class Evictor:
    """Evicts the caches (and the TLB's reach) by copying ``mib`` MiB."""

    def __init__(self, mib: int) -> None:
        self.dst = memoryview(bytearray(mib << 20))
        self.src = bytes(mib << 20)

    def __call__(self) -> None:
        self.dst[:] = self.src  # one memcpy (a bytearray's slice assignment would copy twice)


def measure(stack: str, calls: int, evict: Callable[[], None]) -> dict[str, Any]:
    """Time each traversal of ``calls`` unary calls cold (``evict`` before each), then as
    many warm; every call must end with grpc-status 0."""
    h = Harness(stack)
    relay = h.relay
    clock = time.perf_counter_ns
    # A first call opens the upstream connection; one more warms the code.
    for _ in range(2):
        relay.down_received(h.down, h.request())
        h.connect()
        relay.up_received(h.up, h.answer())  # type: ignore[arg-type]
        h.deliver()
    out: dict[str, Any] = {}
    ok = 0
    for mode in ("cold", "warm"):
        down: list[int] = []
        up: list[int] = []
        for _ in range(calls):
            req = h.request()
            if mode == "cold":
                evict()
            t0 = clock()
            relay.down_received(h.down, req)
            t1 = clock()
            resp = h.answer()
            if mode == "cold":
                evict()
            t2 = clock()
            relay.up_received(h.up, resp)  # type: ignore[arg-type]
            t3 = clock()
            if h.deliver() == "0":
                ok += 1
            down.append(t1 - t0)
            up.append(t3 - t2)
        out[mode] = {"down_received_us": _summary(down), "up_received_us": _summary(up)}
    req = h.request()
    out["down_received_opcodes"] = count_opcodes(lambda: relay.down_received(h.down, req))
    resp = h.answer()
    out["up_received_opcodes"] = count_opcodes(
        lambda: relay.up_received(h.up, resp))  # type: ignore[arg-type]
    if h.deliver() == "0":
        ok += 1
    if ok != 2 * calls + 1:
        raise RuntimeError(f"bench.cold: {2 * calls + 1 - ok} of {2 * calls + 1} calls did not "
                           "end with grpc-status 0")
    out["calls_ok"] = ok
    return out


def count_opcodes(fn: Callable[[], object]) -> int:
    """How many bytecode instructions the interpreter runs in the functions ``fn()`` calls,
    ``fn``'s own frame (a wrapper such as a lambda) left out (``sys.settrace`` with opcode
    events): the size of a traversal's Python work, apart from the machine."""
    count = 0
    outer: list[Any] = []

    def trace(frame: Any, event: str, arg: object) -> Any:
        nonlocal count
        if event == "call":
            if not outer:  # fn's own frame: traced for its calls, its opcodes not counted
                outer.append(frame)
                return trace
            frame.f_trace_opcodes = True
        elif event == "opcode":
            count += 1
        return trace
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def calibrate(samples: int, evict: Callable[[], None]) -> dict[str, float]:
    """Single operations timed cold (median µs, the empty timing subtracted)."""
    clock = time.perf_counter_ns
    data = bytes(REQUEST)

    class Tiny:
        __slots__ = ("a",)

        def __init__(self) -> None:
            self.a = 1

    splice = Splice()
    caller = H2Connection(client=True, limits=Limits())
    caller.initiate()
    caller.data_to_send()
    reads = iter([unary_request(caller, i == 0) for i in range(samples)])
    ops: dict[str, Callable[[bytes], object]] = {
        "nothing": lambda b: None,
        "hash(bytes)": hash,
        "new slotted object": lambda b: Tiny(),
        "bytes slice": lambda b: b[3:9],
        "splice of a request": lambda b: splice.request(next(reads)),
    }
    out: dict[str, float] = {}
    for name, op in ops.items():
        times = []
        for _ in range(samples):
            b = bytes(bytearray(data))  # a new object: no cached hash
            evict()
            t0 = clock()
            op(b)
            times.append(clock() - t0)
        out[name] = statistics.median(times) / 1e3
    base = out.pop("nothing")
    return {name: round(us - base, 1) for name, us in out.items()}


class Splice:
    """A reference, not a relay: the least a Python relay can do with a request's read. It
    walks the frame headers, maps the stream id, looks the header block up in a cache (what
    routing needs) and re-frames the read for upstream, with no flow control, no limits, no
    stream state and no policy. What it costs cold is the floor of a relay's traversal."""

    _HEADER = struct.Struct(">HBBBL")

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.next_id = 1
        self.blocks: dict[bytes, tuple[str, str]] = {bytes(REQUEST): (SERVICE, PATH)}
        self.routed = 0

    def request(self, data: bytes) -> bytes:
        out = []
        pos, n = 0, len(data)
        unpack, pack = self._HEADER.unpack_from, self._HEADER.pack
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            end = pos + 9 + ((hi << 8) | lo)
            up = self.ids.get(sid)
            if up is None:
                up = self.ids[sid] = self.next_id
                self.next_id += 2
            if ftype == 1 and self.blocks.get(data[pos + 9:end]) is not None:
                self.routed += 1
            out.append(pack(hi, lo, ftype, flags, up) + data[pos + 9:end])
            pos = end
        return b"".join(out)


def splice_opcodes() -> int:
    """``count_opcodes`` of the reference splice of one request (a warmed splice)."""
    caller = H2Connection(client=True, limits=Limits())
    caller.initiate()
    caller.data_to_send()
    splice = Splice()
    splice.request(unary_request(caller, True))
    read = unary_request(caller)
    return count_opcodes(lambda: splice.request(read))


def _summary(ns: list[int]) -> dict[str, float]:
    q = statistics.quantiles(ns, n=4) if len(ns) > 1 else [ns[0]] * 3
    return {"p25": round(q[0] / 1e3, 1), "p50": round(statistics.median(ns) / 1e3, 1),
            "p75": round(q[2] / 1e3, 1)}


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("stack", "traversal", "cold p50 us", "cold p25-p75", "warm p50 us", "cold/warm",
             "opcodes")]
    for stack, r in results.items():
        for key, name in (("down_received", "request (down_received)"),
                          ("up_received", "response (up_received)")):
            cold, warm = r["cold"][key + "_us"], r["warm"][key + "_us"]
            rows.append((stack, name, f"{cold['p50']:.1f}", f"{cold['p25']:.1f}-{cold['p75']:.1f}",
                         f"{warm['p50']:.1f}", f"{cold['p50'] / max(warm['p50'], 0.1):.1f}x",
                         f"{r[key + '_opcodes']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w)
                       in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.cold", description=__doc__.split("\n\n")[1])
    ap.add_argument("--calls", type=int, default=300, help="calls timed cold, then warm (300)")
    ap.add_argument("--evict-mib", type=int, default=64,
                    help="MiB copied to evict the caches before each cold traversal (64)")
    ap.add_argument("--stack", choices=(*STACKS, "all"), default="all",
                    help="the layers: none (bare), the sidecar's outbound or inbound stack")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.calls <= 0 or args.evict_mib <= 0:
        print("bench.cold: error: --calls and --evict-mib must be positive", file=sys.stderr)
        return 2
    evict = Evictor(args.evict_mib)
    stacks = STACKS if args.stack == "all" else (args.stack,)
    try:
        results = {s: measure(s, args.calls, evict) for s in stacks}
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    cal = calibrate(max(20, min(args.calls, 200)), evict)
    print(_table(results))
    print("cold single operations (us): " + ", ".join(f"{k} {v:.1f}" for k, v in cal.items()))
    splice_ops = splice_opcodes()
    print(f"opcodes of the splice of a request: {splice_ops}")
    if args.json is not None:
        args.json.write_text(json.dumps({"stacks": results, "calibration_us": cal,
                                         "splice_opcodes": splice_ops,
                                         "calls": args.calls, "evict_mib": args.evict_mib},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
