"""The pure parts of the sidecar's connection and call limits: the per-address connection
counter, the log throttle, the relay's pending-calls limit (exact count of calls waiting in
its pools' queues) and the metric families that report refusals and terminations."""

from __future__ import annotations

import re
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import Limits
from mesh_common.snapshot import Snapshot
from sidecar.http2 import frames as F
from sidecar.http2 import grpc as G
from sidecar.io import AdmissionCounter, LogThrottle
from sidecar.metrics import metrics_page
from tests.unit.test_relay import Caller, Mesh, grpc_message, request_block

SMALL = settings(deadline=None, max_examples=60)


# ================================================================ AdmissionCounter
def test_a_peer_over_its_limit_is_refused_while_another_peer_is_admitted() -> None:
    c = AdmissionCounter(max_total=10, max_per_peer=2)
    assert c.admit("127.0.0.2") is None
    assert c.admit("127.0.0.2") is None
    assert c.admit("127.0.0.2") == "max_connections_per_peer"
    assert c.admit("127.0.0.1") is None
    assert (c.total, c.per_peer) == (3, {"127.0.0.2": 2, "127.0.0.1": 1})


def test_the_total_limit_refuses_every_peer_once_full() -> None:
    c = AdmissionCounter(max_total=3, max_per_peer=2)
    for peer in ("a", "a", "b"):
        assert c.admit(peer) is None
    assert c.admit("c") == "max_connections"
    assert c.admit("b") == "max_connections"
    assert c.admit("a") == "max_connections_per_peer"  # the peer's own limit is named first


def test_release_gives_the_slot_back_and_forgets_idle_addresses() -> None:
    c = AdmissionCounter(max_total=2, max_per_peer=1)
    assert c.admit("a") is None and c.admit("b") is None
    assert c.admit("c") == "max_connections"
    c.release("a")
    assert c.per_peer == {"b": 1} and c.total == 1
    assert c.admit("c") is None
    c.release("b")
    c.release("c")
    assert (c.total, c.per_peer) == (0, {})
    c.release("never-admitted")  # a stray release changes nothing
    assert (c.total, c.per_peer) == (0, {})


@SMALL
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=200),
       st.integers(1, 6), st.integers(1, 4))
def test_admission_counts_match_a_model(ops: list[tuple[bool, int]], max_total: int,
                                        max_per_peer: int) -> None:
    c = AdmissionCounter(max_total, max_per_peer)
    held: dict[str, int] = {}
    for admit, n in ops:
        peer = f"10.0.0.{n}"
        if admit:
            why = c.admit(peer)
            if held.get(peer, 0) >= max_per_peer:
                assert why == "max_connections_per_peer"
            elif sum(held.values()) >= max_total:
                assert why == "max_connections"
            else:
                assert why is None
                held[peer] = held.get(peer, 0) + 1
        elif held.get(peer):
            c.release(peer)
            held[peer] -= 1
        held = {k: v for k, v in held.items() if v}
        assert c.per_peer == held
        assert c.total == sum(held.values()) <= max_total


# ================================================================ LogThrottle
def test_log_throttle_lets_one_line_per_key_per_interval_and_counts_the_rest() -> None:
    t = LogThrottle(10.0)
    assert t.allow("max_connections", 100.0) == 0
    assert t.allow("max_connections", 101.0) is None
    assert t.allow("max_connections", 109.9) is None
    assert t.allow("handshake_timeout", 105.0) == 0  # keys are independent
    assert t.allow("max_connections", 110.0) == 2  # two held back since the last line
    assert t.allow("max_connections", 125.0) == 0


# ================================================================ pending calls
def _blackholed(limit: int) -> Mesh:
    """A mesh whose pool asks for a connection that never comes: calls wait in its queue."""
    mesh = Mesh(limits=Limits(max_pending_calls=limit))
    mesh.pool._connect = lambda pool: None
    return mesh


def _waiting(mesh: Mesh) -> int:
    assert mesh.relay.waiting == len(mesh.pool.waiting)
    return mesh.relay.waiting


def test_a_call_over_the_pending_limit_is_refused_at_once_and_others_keep_waiting() -> None:
    mesh = _blackholed(3)
    caller = mesh.caller()
    waiting = [caller.start(end=True) for _ in range(3)]
    mesh.pump()
    assert _waiting(mesh) == 3
    over = caller.start(end=True)
    mesh.pump()
    assert caller.status(over) == (str(G.RESOURCE_EXHAUSTED), "pending calls limit of 3 reached")
    assert mesh.relay.refused_calls == {"pending_calls": 1}
    refused = next(c for c in mesh.hooks.calls if c.down_sid == over)
    assert refused.fast_fail  # the sidecar's limit: never held against the endpoint
    assert all(not caller.headers[sid] for sid in waiting)  # still waiting, unanswered
    # A waiting call that goes away frees its place at once.
    caller.conn.reset_stream(waiting[0], F.CANCEL)
    mesh.pump()
    assert _waiting(mesh) == 2
    again = caller.start(end=True)
    mesh.pump()
    assert _waiting(mesh) == 3 and not caller.headers[again]


def test_waiting_calls_leave_the_count_on_deadline_connect_failure_and_lost_caller() -> None:
    mesh = _blackholed(10)
    caller = mesh.caller()
    timed = caller.start(request_block(timeout="100m"), end=True)
    for _ in range(3):
        caller.start(end=True)
    mesh.pump()
    assert _waiting(mesh) == 4
    mesh.timers.advance(0.2)
    mesh.pump()
    assert caller.status(timed)[0] == str(G.DEADLINE_EXCEEDED)
    assert _waiting(mesh) == 3
    mesh.pool.connecting = 1
    mesh.relay.pool_failed(mesh.pool, "connection refused")
    mesh.pump()
    assert _waiting(mesh) == 0
    other = mesh.caller()
    for _ in range(2):
        other.start(end=True)
    mesh.pump()
    assert _waiting(mesh) == 2
    down = mesh.pairs[-1][1]
    down.closed = True
    mesh.relay.connection_lost(down, "gone")
    mesh.pump()
    assert _waiting(mesh) == 0


def test_waiting_calls_bind_when_the_connection_comes_and_leave_the_count() -> None:
    mesh = Mesh(limits=Limits(max_pending_calls=2))
    caller = mesh.caller()
    sids = [caller.start(end=False) for _ in range(2)]
    mesh.to_relay(caller)  # the relay sees the calls before the pool's connection is up
    assert _waiting(mesh) == 2
    mesh.pump()
    assert _waiting(mesh) == 0
    for sid in sids:
        caller.send(sid, grpc_message(b"x"), end=True)
    mesh.pump()
    assert [caller.status(sid) for sid in sids] == [("0", "")] * 2
    assert mesh.relay.refused_calls == {}
    mesh.assert_quiet_and_done()


@SMALL
@given(st.lists(st.sampled_from(["start", "start_timed", "reset", "tick", "fail", "lose"]),
                max_size=60), st.integers(1, 5))
def test_the_pending_count_is_exact_whatever_happens(ops: list[str], limit: int) -> None:
    mesh = _blackholed(limit)
    callers: list[Caller] = [mesh.caller()]
    open_sids: list[tuple[Caller, int]] = []
    for op in ops:
        if op == "start" or op == "start_timed":
            caller = callers[-1]
            block = request_block(timeout="50m") if op == "start_timed" else request_block()
            open_sids.append((caller, caller.start(block, end=True)))
        elif op == "reset" and open_sids:
            caller, sid = open_sids.pop(0)
            caller.conn.reset_stream(sid, F.CANCEL)
        elif op == "tick":
            mesh.timers.advance(0.06)
        elif op == "fail":
            mesh.pool.connecting = 1
            mesh.relay.pool_failed(mesh.pool, "refused")
        elif op == "lose" and len(mesh.pairs) > 0:
            caller, down = mesh.pairs.pop()
            down.closed = True
            mesh.relay.connection_lost(down, "gone")
            open_sids = [(c, s) for c, s in open_sids if c is not caller]
            callers.append(mesh.caller())
        mesh.pump()
        live = sum(1 for c in mesh.pool.waiting if not c.finished)
        assert _waiting(mesh) == live <= limit
    refused = mesh.relay.refused_calls.get("pending_calls", 0)
    answered = sum(1 for c in mesh.hooks.calls
                   if c.local_reply is not None and c.local_reply.status == G.RESOURCE_EXHAUSTED)
    assert refused == answered


def test_refused_calls_count_oversized_messages_and_header_lists() -> None:
    mesh = Mesh(limits=Limits(max_message_bytes=64, max_header_list_bytes=1024))
    caller = mesh.caller()
    sid = caller.start()
    caller.send(sid, grpc_message(b"x" * 100), end=True)
    big = caller.start(request_block(extra=(("x-big", "v" * 2000),)), end=True)
    mesh.pump()
    assert caller.status(sid)[0] == str(G.RESOURCE_EXHAUSTED)
    assert caller.status(big)[0] == str(G.RESOURCE_EXHAUSTED)
    assert mesh.relay.refused_calls == {"message_too_large": 1, "header_list_too_large": 1}


# ================================================================ metrics
def test_terminated_connections_and_refused_calls_are_exported_per_listener() -> None:
    listener = SimpleNamespace(
        name="inbound", handshakes=3, handshake_failures=1,
        rejected={"max_connections_per_peer": 7, "handshake_timeout": 2},
        terminated={"rapid_reset": 1, "stall": 2},
        refused_calls={"pending_calls": 4, "max_concurrent_streams": 5})
    outbound = SimpleNamespace(name="outbound", handshakes=0, handshake_failures=0,
                               rejected={}, terminated={}, refused_calls={"message_too_large": 1})
    view = SimpleNamespace(
        boot=SimpleNamespace(service="web"), snapshot=Snapshot("1"), stacks={}, relays={},
        inbound=listener, outbound=outbound, tls_failures={}, cert_not_after=lambda: None,
        traces={}, tracer=None,
        connectors={"outbound": SimpleNamespace(refused={}, tls_failures={},
                                                terminated={"flow_control": 1}),
                    "inbound": SimpleNamespace(refused={}, tls_failures={},
                                               terminated={"flow_control": 2, "stall": 1})})
    text = metrics_page(view).data.decode()  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
        assert m, f"{name}{{{want}}} not in:\n{text}"
        return float(m.group(1))

    assert value("mesh_connections_refused_total", listener="inbound",
                 reason="max_connections_per_peer") == 7
    assert value("mesh_connections_refused_total", listener="inbound",
                 reason="handshake_timeout") == 2
    assert value("mesh_connections_terminated_total", listener="inbound", reason="stall") == 2
    assert value("mesh_connections_terminated_total", listener="inbound",
                 reason="rapid_reset") == 1
    assert value("mesh_connections_terminated_total", listener="upstream",
                 reason="flow_control") == 3
    assert value("mesh_connections_terminated_total", listener="upstream", reason="stall") == 1
    assert value("mesh_calls_refused_total", listener="inbound", reason="pending_calls") == 4
    assert value("mesh_calls_refused_total", listener="inbound",
                 reason="max_concurrent_streams") == 5
    assert value("mesh_calls_refused_total", listener="outbound",
                 reason="message_too_large") == 1
    assert "# TYPE mesh_connections_terminated_total counter" in text
    assert "# TYPE mesh_calls_refused_total counter" in text
