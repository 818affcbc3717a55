"""Pure pieces of the data path: gRPC framing/timeouts/messages, SPIFFE IDs, bootstrap config,
limits, and the upstream pool's choice of connection."""

from __future__ import annotations

import copy
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.bootstrap import ConfigError, parse_bootstrap
from mesh_common.limits import Limits
from mesh_common.spiffe import SpiffeError, SpiffeId, spiffe_ids_from_sans
from sidecar.http2 import grpc as G
from sidecar.http2.connection import H2Connection
from sidecar.http2.pool import Pool

FAST = settings(deadline=None, max_examples=60)
FUZZ = settings(deadline=None, max_examples=2000)


def _msg(n: int, compressed: int = 0) -> bytes:
    return bytes([compressed]) + struct.pack(">L", n) + b"x" * n


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def _verdict(meter: G.MessageMeter, chunks: list[bytes]) -> int:
    for chunk in chunks:
        got = meter.feed(chunk)
        if got >= 0:
            return got
    return -1


# ---------------------------------------------------------------- MessageMeter
def test_message_meter_counts_messages_and_accepts_at_the_limit() -> None:
    meter = G.MessageMeter(100)
    assert meter.feed(_msg(0) + _msg(100) + _msg(7)) == -1
    assert meter.messages == 3


def test_message_meter_reports_the_first_over_limit_length() -> None:
    meter = G.MessageMeter(100)
    assert meter.feed(_msg(10) + _msg(101) + _msg(5000)) == 101


def test_message_meter_detects_over_limit_from_the_prefix_alone() -> None:
    meter = G.MessageMeter(1024)
    assert meter.feed(b"\x00\x00\x00") == -1
    assert meter.feed(b"\x10\x00") == 0x1000  # the 4 MiB message never has to arrive


@FAST
@given(sizes=st.lists(st.integers(0, 300), max_size=8), limit=st.integers(0, 250),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_message_meter_verdict_is_independent_of_the_split(sizes: list[int], limit: int,
                                                           cuts: list[int]) -> None:
    stream = b"".join(_msg(n) for n in sizes)
    expected = next((n for n in sizes if n > limit), -1)
    assert _verdict(G.MessageMeter(limit), [stream]) == expected
    assert _verdict(G.MessageMeter(limit), _splits(stream, cuts)) == expected
    one_byte = G.MessageMeter(limit)
    assert _verdict(one_byte, [stream[i:i + 1] for i in range(len(stream))]) == expected
    if expected < 0:
        assert one_byte.messages == len(sizes)


# ---------------------------------------------------------------- grpc-timeout
_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


@pytest.mark.parametrize(("value", "seconds"), [
    ("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("100m", 0.1), ("250u", 250e-6),
    ("7n", 7e-9), ("99999999S", 99999999.0), ("0m", 0.0),
])
def test_parse_timeout_valid(value: str, seconds: float) -> None:
    assert G.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "", "m", "1", "10", "1x", "-1S", "+1S", "1.5S", " 1S", "1S ", "123456789S", "1s", "1h",
    "1 S", "0x1m", "\u00b2m", "\u00b9\u00b3S", "\u0663m", "1\u00b2m",
])
def test_parse_timeout_malformed_is_none(value: str) -> None:
    assert G.parse_timeout(value) is None


@FAST
@given(seconds=st.floats(min_value=1e-9, max_value=1e9, allow_nan=False))
def test_format_timeout_round_trips_within_one_unit(seconds: float) -> None:
    text = G.format_timeout(seconds)
    assert len(text) <= 9
    digits, unit = text[:-1], text[-1]
    assert digits.isdigit() and len(digits) <= 8
    parsed = G.parse_timeout(text)
    assert parsed is not None
    if seconds <= 99_999_999:
        assert abs(parsed - seconds) <= _UNIT_S[unit] * (1 + 1e-9)
        assert parsed <= seconds * (1 + 1e-12) or unit == "u"  # never longer than asked (but 1u)
    else:
        assert parsed == 99_999_999.0


def test_format_timeout_non_positive_is_the_smallest_timeout() -> None:
    assert G.format_timeout(0) == "1n"
    assert G.format_timeout(-5) == "1n"
    assert G.format_timeout(1e-9) == "1u"


@FAST
@given(value=st.text(max_size=12))
def test_parse_timeout_never_raises(value: str) -> None:
    got = G.parse_timeout(value)
    assert got is None or got >= 0


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@FUZZ
@given(value=st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=10))
def test_parse_timeout_never_raises_on_latin1_fuzz(value: str) -> None:
    got = G.parse_timeout(value)
    assert got is None or got >= 0


# ---------------------------------------------------------------- grpc-message
@FAST
@given(text=st.text())
def test_percent_encode_decode_round_trip(text: str) -> None:
    encoded = G.percent_encode(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert G.percent_decode(encoded) == text


def test_percent_encoding_examples() -> None:
    assert G.percent_encode("a b%c") == "a b%25c"
    assert G.percent_encode("\u00e9\n") == "%C3%A9%0A"
    assert G.percent_decode("100%") == "100%"
    assert G.percent_decode("%zz%4") == "%zz%4"
    assert G.percent_decode("%e2%9C%93") == "\u2713"


@FAST
@given(value=st.text(alphabet=st.characters(max_codepoint=0xFF)))
def test_percent_decode_never_raises(value: str) -> None:
    G.percent_decode(value)


def test_trailers_blocks_carry_the_status() -> None:
    from hpack import Decoder
    only = Decoder().decode(G.trailers_only_block(G.UNAVAILABLE, "upstream x: down"), raw=True)
    assert (b":status", b"200") in only and (b"grpc-status", b"14") in only
    assert (b"grpc-message", b"upstream x: down") in only
    trailers = Decoder().decode(G.trailers_block(G.OK, "\u00e9"), raw=True)
    assert trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"%C3%A9")]


# ---------------------------------------------------------------- SPIFFE
@pytest.mark.parametrize("uri", [
    "spiffe://mesh.local/service/payment", "spiffe://a/service/B-2_x.y",
    "spiffe://td-1.example_org/service/" + "s" * 128,
])
def test_spiffe_id_parse_and_format_round_trip(uri: str) -> None:
    sid = SpiffeId.parse(uri)
    assert sid.uri == uri == str(sid)
    assert SpiffeId(sid.trust_domain, sid.service) == sid


@pytest.mark.parametrize("uri", [
    "", "spiffe://", "http://mesh.local/service/x", "spiffe://mesh.local/x",
    "spiffe://mesh.local/services/x", "spiffe://mesh.local/service/", "spiffe:///service/x",
    "spiffe://Mesh.local/service/x", "spiffe://mesh.local/service/x/y",
    "spiffe://mesh.local/service/-x", "spiffe://mesh.local/service/" + "s" * 129,
    "spiffe://mesh local/service/x", "spiffe://mesh.local/service/x y",
    "spiffe://mesh.local/service/x\n", "spiffe://mesh.local\n/service/x",
    "SPIFFE://mesh.local/service/x", "spiffe://" + "a" * 256 + "/service/x",
])
def test_spiffe_id_parse_rejects_malformed(uri: str) -> None:
    with pytest.raises(SpiffeError):
        SpiffeId.parse(uri)


@pytest.mark.parametrize(("td", "svc"), [
    (None, "x"), ("mesh.local", None), (5, "x"), ("mesh.local", 5), (b"mesh", "x"),
])
def test_spiffe_id_rejects_non_strings(td: object, svc: object) -> None:
    with pytest.raises(SpiffeError):
        SpiffeId(td, svc)  # type: ignore[arg-type]


def test_spiffe_id_parse_rejects_non_string() -> None:
    with pytest.raises(SpiffeError):
        SpiffeId.parse(None)  # type: ignore[arg-type]


@FAST
@given(td=st.from_regex(r"\A[a-z0-9._-]{1,40}\Z"),
       svc=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z"))
def test_spiffe_id_valid_round_trip_property(td: str, svc: str) -> None:
    assert SpiffeId.parse(SpiffeId(td, svc).uri) == SpiffeId(td, svc)


@FAST
@given(uri=st.text(max_size=60))
def test_spiffe_id_parse_only_raises_spiffe_error(uri: str) -> None:
    try:
        sid = SpiffeId.parse(uri)
    except SpiffeError:
        return
    assert sid.uri == uri


def test_spiffe_ids_from_sans() -> None:
    sans = (("DNS", "x"), ("URI", "spiffe://a/service/b"), ("URI", "https://x"), ("URI", 5), "bad")
    assert spiffe_ids_from_sans(sans) == ["spiffe://a/service/b"]
    assert spiffe_ids_from_sans(None) == []


# ---------------------------------------------------------------- bootstrap
VALID_DOC = {
    "service": "order",
    "trust_domain": "mesh.local",
    "tls": {"cert": "/c.pem", "key": "/k.pem", "ca": "/ca.pem"},
    "inbound": {"listen": "0.0.0.0:15006", "app": "127.0.0.1:8080"},
    "outbound": {"listen": "127.0.0.1:15001"},
    "admin": {"listen": "[::1]:15000"},
    "limits": {"max_message_bytes": 1024 * 1024, "connect_timeout_s": 2.5},
    "clusters": [
        {"name": "payment", "endpoints": [
            {"address": "10.0.0.2:15006"},
            {"address": "10.0.0.3:15006", "spiffe_id": "spiffe://mesh.local/service/payment"},
        ]},
        {"name": "inventory", "endpoints": []},
    ],
}


def _doc(**changes: object) -> dict:
    """VALID_DOC with dotted-path changes; a value of ... deletes the key."""
    doc = copy.deepcopy(VALID_DOC)
    for path, value in changes.items():
        keys = path.split("__")
        node = doc
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return doc


def test_parse_bootstrap_full_valid_document() -> None:
    boot = parse_bootstrap(copy.deepcopy(VALID_DOC))
    assert boot.service == "order" and boot.trust_domain == "mesh.local"
    assert boot.spiffe_id == "spiffe://mesh.local/service/order"
    assert (boot.cert_file, boot.key_file, boot.ca_file) == ("/c.pem", "/k.pem", "/ca.pem")
    assert str(boot.inbound) == "0.0.0.0:15006" and str(boot.app) == "127.0.0.1:8080"
    assert str(boot.outbound) == "127.0.0.1:15001"
    assert boot.admin.host == "::1" and boot.admin.port == 15000
    assert boot.limits.max_message_bytes == 1024 * 1024
    assert boot.limits.connect_timeout_s == 2.5
    assert boot.limits.max_concurrent_streams == Limits().max_concurrent_streams
    payment = boot.snapshot.cluster("payment")
    assert payment is not None
    assert [e.address for e in payment.endpoints] == ["10.0.0.2:15006", "10.0.0.3:15006"]
    assert {e.spiffe_id for e in payment.endpoints} == {"spiffe://mesh.local/service/payment"}
    assert boot.snapshot.cluster("inventory").endpoints == ()
    assert boot.snapshot.cluster("nope") is None
    assert len(boot.snapshot.content_hash()) == 16


def test_parse_bootstrap_minimal_document_takes_safe_defaults() -> None:
    boot = parse_bootstrap({"service": "x", "tls": {"cert": "c", "key": "k", "ca": "a"}})
    assert boot.trust_domain == "mesh.local"
    assert boot.inbound is None and boot.app is None and boot.outbound is None
    assert str(boot.admin) == "127.0.0.1:15000"
    assert boot.limits == Limits()
    assert boot.snapshot.clusters == ()


@pytest.mark.parametrize(("changes", "field"), [
    ({"service": ...}, "service"),
    ({"service": ""}, "service"),
    ({"service": 5}, "service"),
    ({"service": "bad name"}, "service"),
    ({"trust_domain": "Bad.Domain"}, "trust_domain"),
    ({"trust_domain": 5}, "trust_domain"),
    ({"trust_domain": None}, "trust_domain"),
    ({"trust_domain": ""}, "trust_domain"),
    ({"bogus": 1}, "bogus"),
    ({"tls": ...}, "tls"),
    ({"tls": "x"}, "tls"),
    ({"tls__cert": ...}, "tls.cert"),
    ({"tls__key": ""}, "tls.key"),
    ({"tls__ca": 7}, "tls.ca"),
    ({"inbound": []}, "inbound"),
    ({"inbound__app": ...}, "inbound.app"),
    ({"inbound__app": "10.0.0.1:8080"}, "inbound.app"),
    ({"inbound__app": "example.com:8080"}, "inbound.app"),
    ({"inbound__listen": "0.0.0.0"}, "inbound.listen"),
    ({"inbound__listen": "0.0.0.0:99999"}, "inbound.listen"),
    ({"inbound__listen": "0.0.0.0:-1"}, "inbound.listen"),
    ({"inbound__listen": ":15006"}, "inbound.listen"),
    ({"inbound__listen": "0.0.0.0:\u00b2"}, "inbound.listen"),
    ({"inbound__listen": 15006}, "inbound.listen"),
    ({"outbound": 3}, "outbound"),
    ({"outbound__listen": "0.0.0.0:15001"}, "outbound.listen"),
    ({"admin": "x"}, "admin"),
    ({"admin__listen": "192.168.1.1:15000"}, "admin.listen"),
    ({"limits": 5}, "limits"),
    ({"limits": {"max_bogus": 1}}, "limits.max_bogus"),
    ({"limits": {"max_message_bytes": -1}}, "limits.max_message_bytes"),
    ({"limits": {"max_message_bytes": 0}}, "limits.max_message_bytes"),
    ({"limits": {"max_message_bytes": "big"}}, "limits.max_message_bytes"),
    ({"limits": {"max_message_bytes": 1.5}}, "limits.max_message_bytes"),
    ({"limits": {"stream_window_bytes": True}}, "limits.stream_window_bytes"),
    ({"limits": {"stream_window_bytes": 1000}}, "limits.stream_window_bytes"),
    ({"limits": {"stream_window_bytes": 65535.5}}, "limits.stream_window_bytes"),
    ({"limits": {"connection_window_bytes": 2**31}}, "limits.connection_window_bytes"),
    ({"limits": {"max_concurrent_streams": 0}}, "limits.max_concurrent_streams"),
    ({"limits": {"max_header_list_bytes": 100}}, "limits.max_header_list_bytes"),
    ({"limits": {"connect_timeout_s": -1}}, "limits.connect_timeout_s"),
    ({"clusters": {"a": 1}}, "clusters"),
    ({"clusters__0": "payment"}, "clusters[0]"),
    ({"clusters__0__name": ...}, "clusters[0].name"),
    ({"clusters__0__name": "bad name"}, "clusters[0].name"),
    ({"clusters__1__name": "payment"}, "clusters[1].name"),
    ({"clusters__0__endpoints": "10.0.0.2:1"}, "clusters[0].endpoints"),
    ({"clusters__0__endpoints__0": "10.0.0.2:1"}, "clusters[0].endpoints[0]"),
    ({"clusters__0__endpoints__0__address": ...}, "clusters[0].endpoints[0].address"),
    ({"clusters__0__endpoints__0__address": "10.0.0.2:0"}, "clusters[0].endpoints[0].address"),
    ({"clusters__0__endpoints__0__address": "10.0.0.2"}, "clusters[0].endpoints[0].address"),
    ({"clusters__0__endpoints__1__spiffe_id": "spiffe://x/y"}, "clusters[0].endpoints[1].spiffe_id"),
    ({"clusters__0__endpoints__1__spiffe_id": 5}, "clusters[0].endpoints[1].spiffe_id"),
])
def test_parse_bootstrap_invalid_field_is_named(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bootstrap(_doc(**changes))
    assert field in str(err.value), str(err.value)


@pytest.mark.parametrize("doc", [None, [], "service: x", 5])
def test_parse_bootstrap_rejects_non_mapping(doc: object) -> None:
    with pytest.raises(ConfigError, match="config"):
        parse_bootstrap(doc)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@FAST
@given(key=st.sampled_from(sorted(VALID_DOC)), value=_JSONISH)
def test_parse_bootstrap_garbage_in_any_section_is_a_config_error(key: str, value: object) -> None:
    doc = copy.deepcopy(VALID_DOC)
    doc[key] = value
    try:
        parse_bootstrap(doc)
    except ConfigError:
        pass


# ---------------------------------------------------------------- Limits
def test_limits_defaults_are_valid_and_frozen() -> None:
    lim = Limits()
    with pytest.raises(AttributeError):
        lim.max_message_bytes = 1  # type: ignore[misc]
    assert lim.stream_window_bytes <= lim.connection_window_bytes


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_message_bytes": -1}, "max_message_bytes"),
    ({"max_message_bytes": 0}, "max_message_bytes"),
    ({"max_concurrent_streams": 0}, "max_concurrent_streams"),
    ({"max_header_list_bytes": 1023}, "max_header_list_bytes"),
    ({"stream_window_bytes": 65534}, "stream_window_bytes"),
    ({"stream_window_bytes": 2**31}, "stream_window_bytes"),
    ({"connection_window_bytes": 65534}, "connection_window_bytes"),
    ({"connection_window_bytes": 2**31}, "connection_window_bytes"),
    ({"replay_buffer_bytes": True}, "replay_buffer_bytes"),
    ({"idle_timeout_s": "5"}, "idle_timeout_s"),
    ({"keepalive_interval_s": -0.1}, "keepalive_interval_s"),
    ({"stream_window_bytes": 100000.5}, "stream_window_bytes"),
    ({"max_concurrent_streams": 2.5}, "max_concurrent_streams"),
])
def test_limits_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        Limits(**kwargs)
    assert field in str(err.value), str(err.value)


def test_limits_accept_boundaries_and_float_seconds() -> None:
    lim = Limits(stream_window_bytes=65535, connection_window_bytes=2**31 - 1,
                 max_header_list_bytes=1024, max_concurrent_streams=1, connect_timeout_s=1,
                 idle_timeout_s=0.25, max_connection_age_s=0)
    conn = H2Connection(client=True, limits=lim)
    conn.initiate()  # every limit that goes on the wire must serialise
    assert conn.data_to_send()


# ---------------------------------------------------------------- Pool
class _FakeConn:
    """Just what Pool looks at: can_open_stream() and active_streams."""

    def __init__(self, streams: int, can_open: bool = True) -> None:
        self.active_streams = streams
        self.can_open = can_open

    def can_open_stream(self) -> bool:
        return self.can_open


def _pool(max_connections: int = 2) -> tuple[Pool, list[Pool]]:
    requested: list[Pool] = []
    return Pool("k", "label", max_connections, requested.append), requested


def test_pool_acquire_picks_the_connection_with_fewest_streams() -> None:
    pool, requested = _pool(3)
    a, b, c = _FakeConn(5), _FakeConn(2), _FakeConn(9)
    for conn in (a, b, c):
        pool.connected(conn)  # type: ignore[arg-type]
    assert pool.acquire() is b
    b.active_streams = 6
    assert pool.acquire() is a
    a.can_open = False
    assert pool.acquire() is b
    assert requested == []


def test_pool_acquire_starts_one_connection_at_a_time_and_only_when_there_is_room() -> None:
    pool, requested = _pool(2)
    assert pool.acquire() is None
    assert requested == [pool] and pool.connecting == 1
    assert pool.acquire() is None  # one attempt is under way: no second one yet
    assert len(requested) == 1
    pool.connected(_FakeConn(0, can_open=False))  # type: ignore[arg-type]  # up, but full
    assert pool.connecting == 0
    assert pool.acquire() is None and len(requested) == 2  # room for the second
    assert pool.acquire() is None and len(requested) == 2  # 1 conn + 1 connecting = max
    assert pool.connect_failed("refused") is True  # nothing under way, no usable connection
    assert pool.last_error == "refused"
    assert pool.acquire() is None and len(requested) == 3  # room again after the failure


def test_pool_connect_failed_reports_when_waiting_calls_have_nowhere_to_go() -> None:
    pool, requested = _pool(2)
    pool.acquire()
    assert pool.connect_failed("a") is True  # the only attempt failed
    pool.acquire()
    pool.connected(_FakeConn(0))  # type: ignore[arg-type]
    pool.connecting += 1  # another attempt under way (as ensure_connecting would start)
    assert pool.connect_failed("c") is False  # a usable connection exists


def test_pool_ensure_connecting_and_closed_pool() -> None:
    pool, requested = _pool(1)
    pool.ensure_connecting()
    assert len(requested) == 1
    pool.ensure_connecting()  # already under way
    assert len(requested) == 1
    pool.connect_failed("x")
    pool.closed = True
    assert pool.acquire() is None and len(requested) == 1


def test_pool_pick_skips_draining_connections_and_remove() -> None:
    pool, requested = _pool(3)
    busy_draining, idle_draining, open_idle = _FakeConn(1, False), _FakeConn(0, False), _FakeConn(0)
    for conn in (busy_draining, idle_draining, open_idle):
        pool.connected(conn)  # type: ignore[arg-type]
    assert pool.pick() is open_idle and requested == []
    pool.remove(idle_draining)  # type: ignore[arg-type]
    pool.remove(idle_draining)  # type: ignore[arg-type]  # twice is harmless
    assert pool.conns == [busy_draining, open_idle]


def test_pool_max_connections_is_at_least_one() -> None:
    pool, requested = _pool(0)
    assert pool.acquire() is None and len(requested) == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_limit_timeouts_must_be_finite_and_non_negative(value: float) -> None:
    with pytest.raises(ValueError, match="non-negative finite number"):
        Limits(handshake_timeout_s=value)
