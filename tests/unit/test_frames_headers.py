"""Frame serialisers and the HPACK header reader (scan context-free blocks, decode the rest),
checked against the ``hpack`` library as the reference encoder and decoder."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.http2 import frames as F
from sidecar.http2 import headers as headers_mod
from sidecar.http2.headers import (
    HOP_BY_HOP,
    PER_CALL_FIELDS,
    WANTED,
    HeaderListTooLarge,
    HeaderReader,
    HpackError,
    encode_block,
    encode_literal,
)

FAST = settings(deadline=None, max_examples=40)
FUZZ = settings(deadline=None, max_examples=2000)
BIG = 1 << 20  # a header list limit no generated list reaches

# ---------------------------------------------------------------- strategies
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
PRINTABLE_LATIN1 = "".join(chr(c) for c in [*range(0x20, 0x7F), *range(0xA0, 0x100)])
SPECIAL_NAMES = [
    ":authority", ":path", ":method", ":scheme", ":status", "grpc-timeout", "te", "connection",
    "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "content-type",
    "grpc-status", "grpc-message", "traceparent", "user-agent", "accept-encoding",
]
values = st.text(alphabet=PRINTABLE_LATIN1, max_size=40)
# Values that hit the static table exactly (indexed fields), e.g. ":method: POST",
# "transfer-encoding: ''", "accept-encoding: gzip, deflate".
static_pairs = st.sampled_from([
    (":method", "POST"), (":method", "GET"), (":path", "/"), (":scheme", "http"),
    (":status", "200"), ("transfer-encoding", ""), ("accept-encoding", "gzip, deflate"),
    ("upgrade", ""), ("te", ""),
])
fields = st.one_of(
    st.tuples(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12), values),
    st.tuples(st.sampled_from(SPECIAL_NAMES), values),
    st.tuples(st.just("te"), st.sampled_from(["trailers", "gzip", "trailers, deflate"])),
    st.tuples(st.just("grpc-timeout"),
              st.from_regex(r"\A[0-9]{1,8}[HMSmun]\Z") | st.sampled_from(["", "x", "1.5S"])),
    static_pairs,
)


def _one_timeout(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """At most one grpc-timeout (with two, which one is "the" original is not defined)."""
    seen = False
    out = []
    for name, value in pairs:
        if name == "grpc-timeout":
            if seen:
                continue
            seen = True
        out.append((name, value))
    return out


header_lists = st.lists(fields, max_size=12).map(_one_timeout)
block_specs = st.lists(
    st.tuples(header_lists, st.booleans(), st.lists(st.booleans(), min_size=12, max_size=12)),
    min_size=1, max_size=5,
)  # (fields, huffman, never-indexed flags per field)


def _b(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


def _encode(enc: Encoder, pairs: list[tuple[str, str]], huffman: bool, sensitive: list[bool]) -> bytes:
    items = [(n, v, s) for (n, v), s in zip(_b(pairs), sensitive, strict=False)]
    return enc.encode(items, huffman=huffman)


def _forwarded(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """What a relay must pass on: the list minus hop-by-hop fields (and te unless trailers)."""
    return [(n, v) for n, v in _b(pairs)
            if n.decode() not in HOP_BY_HOP and not (n == b"te" and v != b"trailers")]


def _fresh_decode(block: bytes) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in Decoder().decode(block, raw=True)]


def _check_block(hb, pairs: list[tuple[str, str]], reference: list, huffman: bool = True) -> None:
    """``hb`` (from HeaderReader) against ``pairs`` and the reference decoder's list."""
    ref = [(bytes(n), bytes(v)) for n, v in reference]
    assert ref == _b(pairs)
    for name in WANTED:
        first = next((v.decode("latin-1") for n, v in ref if n.decode() == name), None)
        assert hb.get(name) == first, name
    exact = sum(len(n) + len(v) + 32 for n, v in ref)
    # A scanned Huffman value counts at its wire length (only a pre-check before exact sizing).
    assert hb.list_bytes == exact or (not hb.decoded and huffman)
    # Forwardable as received: minus hop-by-hop, readable by a decoder with no context.
    assert _fresh_decode(hb.forwardable()) == _forwarded(pairs)
    # With a new grpc-timeout: exactly one, where the original was (else appended).
    expected = _forwarded(pairs)
    pos = next((i for i, (n, _) in enumerate(expected) if n == b"grpc-timeout"), None)
    if pos is None:
        expected.append((b"grpc-timeout", b"123m"))
    else:
        expected[pos] = (b"grpc-timeout", b"123m")
    assert _fresh_decode(hb.forwardable("123m")) == expected


# ---------------------------------------------------------------- frames
@FAST
@given(length=st.integers(0, F.MAX_FRAME_BYTES_LIMIT), ftype=st.integers(0, 255),
       flags=st.integers(0, 255), sid=st.integers(0, 2**32 - 1))
def test_frame_header_round_trip(length: int, ftype: int, flags: int, sid: int) -> None:
    raw = F.frame_header(length, ftype, flags, sid)
    assert len(raw) == F.FRAME_HEADER_BYTES
    assert F.parse_frame_header(raw) == (length, ftype, flags, sid & 0x7FFFFFFF)
    assert F.parse_frame_header(b"xx" + raw, 2) == (length, ftype, flags, sid & 0x7FFFFFFF)


def test_parse_frame_header_masks_the_reserved_bit() -> None:
    raw = bytes([0, 0, 4, F.RST_STREAM, 0, 0x80, 0, 0, 3])
    assert F.parse_frame_header(raw) == (4, F.RST_STREAM, 0, 3)


def _split_frames(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(raw):
        length, ftype, flags, sid = F.parse_frame_header(raw, pos)
        out.append((ftype, flags, sid, raw[pos + 9:pos + 9 + length]))
        pos += 9 + length
    assert pos == len(raw)
    return out


@FAST
@given(block=st.binary(max_size=600), max_frame=st.integers(1, 200), end=st.booleans(),
       sid=st.integers(1, 2**31 - 1))
def test_headers_frames_split_into_continuations_and_reassemble(block: bytes, max_frame: int,
                                                               end: bool, sid: int) -> None:
    frames = _split_frames(F.headers_frames(sid, block, end, max_frame))
    assert frames[0][0] == F.HEADERS
    assert all(f[0] == F.CONTINUATION for f in frames[1:])
    assert all(f[2] == sid for f in frames)
    assert all(len(f[3]) <= max_frame for f in frames)
    assert all(len(f[3]) == max_frame for f in frames[:-1])  # no needless extra frames
    assert len(frames) == max(1, -(-len(block) // max_frame))
    assert [bool(f[1] & F.FLAG_END_HEADERS) for f in frames] == [False] * (len(frames) - 1) + [True]
    assert bool(frames[0][1] & F.FLAG_END_STREAM) == end
    assert not any(f[1] & F.FLAG_END_STREAM for f in frames[1:])
    assert b"".join(f[3] for f in frames) == block


def test_headers_frames_at_the_real_frame_size() -> None:
    block = bytes(range(256)) * 200  # 51200 bytes: HEADERS + 3 CONTINUATION
    frames = _split_frames(F.headers_frames(7, block, True, F.DEFAULT_MAX_FRAME_BYTES))
    assert [len(f[3]) for f in frames] == [16384, 16384, 16384, 2048]
    assert b"".join(f[3] for f in frames) == block


def test_control_frame_serialisers() -> None:
    assert _split_frames(F.rst_stream_frame(3, F.CANCEL)) == [(F.RST_STREAM, 0, 3, b"\0\0\0\x08")]
    assert _split_frames(F.ping_frame(b"12345678", ack=True)) == [(F.PING, 1, 0, b"12345678")]
    (ftype, flags, sid, body), = _split_frames(F.goaway_frame(2**31 + 5, F.ENHANCE_YOUR_CALM, b"dbg"))
    assert (ftype, sid) == (F.GOAWAY, 0)
    assert F.unpack_goaway(body) == (5, F.ENHANCE_YOUR_CALM) and body[8:] == b"dbg"
    (_, _, _, body), = _split_frames(F.window_update_frame(9, 2**31 + 10))
    assert F.unpack_u32(body) == 10
    (_, flags, _, body), = _split_frames(F.settings_frame({F.SETTINGS_MAX_FRAME_SIZE: 20000}))
    assert flags == 0 and F.unpack_setting(body, 0) == (F.SETTINGS_MAX_FRAME_SIZE, 20000)
    assert _split_frames(F.settings_frame(ack=True)) == [(F.SETTINGS, F.FLAG_ACK, 0, b"")]
    assert _split_frames(F.data_frame(1, memoryview(b"abc"), True)) == [(F.DATA, 1, 1, b"abc")]


# ---------------------------------------------------------------- HeaderReader: scan and decode
@FAST
@given(specs=block_specs)
def test_context_free_blocks_are_scanned_not_decoded(specs) -> None:
    enc = Encoder()
    enc.header_table_size = 0
    ref = Decoder()
    reader = HeaderReader(BIG)
    for i, (pairs, huffman, sensitive) in enumerate(specs):
        block = _encode(enc, pairs, huffman, sensitive)
        if i == 0:
            assert block[:1] == b"\x20"  # the size update to 0 comes first
        hb = reader.read(block)
        assert hb.decoded is False
        assert reader.table_size == 0
        _check_block(hb, pairs, ref.decode(block, raw=True), huffman)


@FAST
@given(specs=block_specs)
def test_blocks_using_the_dynamic_table_are_decoded_in_sequence(specs) -> None:
    enc = Encoder()
    ref = Decoder()
    reader = HeaderReader(BIG)
    for pairs, huffman, sensitive in specs:
        block = _encode(enc, pairs, huffman, sensitive)
        hb = reader.read(block)
        dynamic = any(b & 0xC0 == 0x40 or (b & 0x80 and b & 0x7F > 61) for b in _reps(block))
        if dynamic:
            assert hb.decoded is True
        _check_block(hb, pairs, ref.decode(block, raw=True), huffman)
        if hb.decoded:  # what we forward never depends on a dynamic table
            assert not any(b & 0xC0 == 0x40 or b & 0x80 for b in _reps(hb.forwardable("1S")))


@FAST
@given(specs=block_specs, sizes=st.lists(st.sampled_from([0, 4096, 64, 4096]), min_size=5, max_size=5))
def test_table_size_changes_mid_connection_keep_the_reader_in_step(specs, sizes) -> None:
    enc = Encoder()
    ref = Decoder()
    reader = HeaderReader(BIG)
    for (pairs, huffman, sensitive), size in zip(specs, sizes, strict=False):
        enc.header_table_size = size
        block = _encode(enc, pairs, huffman, sensitive)
        _check_block(reader.read(block), pairs, ref.decode(block, raw=True), huffman)
        assert reader.table_size == size


def _reps(block: bytes) -> list[int]:
    """First byte of every representation in a well-formed block (for classifying it)."""
    out, pos = [], 0
    while pos < len(block):
        b = block[pos]
        out.append(b)
        if b & 0x80:
            pos = _skip_int(block, pos, 7)
        elif b & 0xE0 == 0x20:
            pos = _skip_int(block, pos, 5)
        else:
            prefix = 6 if b & 0xC0 == 0x40 else 4
            idx_zero = b & ((1 << prefix) - 1) == 0
            pos = _skip_int(block, pos, prefix)
            if idx_zero:
                pos = _skip_str(block, pos)
            pos = _skip_str(block, pos)
    return out


def _skip_int(buf: bytes, pos: int, prefix: int) -> int:
    mask = (1 << prefix) - 1
    if buf[pos] & mask < mask:
        return pos + 1
    pos += 1
    while buf[pos] & 0x80:
        pos += 1
    return pos + 1


def _skip_str(buf: bytes, pos: int) -> int:
    mask = 0x7F
    value = buf[pos] & mask
    if value < mask:
        return pos + 1 + value
    shift, value, pos = 0, mask, pos + 1
    while True:
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return pos + value


def test_scanned_block_is_forwarded_verbatim_when_nothing_changes() -> None:
    block = encode_block([(":path", "/svc/M"), (":authority", "payment"), ("te", "trailers")])
    hb = HeaderReader(BIG).read(block)
    assert hb.decoded is False
    assert hb.forwardable() is block
    assert hb.get(":path") == "/svc/M" and hb.get("te") == "trailers"


def test_hop_by_hop_fields_are_stripped_in_every_representation() -> None:
    enc = Encoder()
    enc.header_table_size = 0
    pairs = [(":path", "/a"), ("connection", "close"), ("transfer-encoding", ""),
             ("upgrade", ""), ("te", "gzip"), ("keep-alive", "5"), ("proxy-connection", "x"),
             ("te", "trailers"), ("x", "y")]
    for huffman in (False, True):
        hb = HeaderReader(BIG).read(_encode(enc, pairs, huffman, [False] * 9))
        assert _fresh_decode(hb.forwardable()) == [(b":path", b"/a"), (b"te", b"trailers"), (b"x", b"y")]


def test_never_indexed_fields_stay_never_indexed_when_re_encoded() -> None:
    enc = Encoder()  # dynamic table: the block is decoded and re-encoded
    block = enc.encode([(b"authorization", b"secret", True), (b"x-a", b"1")], huffman=True)
    hb = HeaderReader(BIG).read(block)
    assert hb.decoded
    out = hb.forwardable()
    assert out[0] & 0xF0 == 0x10  # never-indexed literal
    assert _fresh_decode(out) == [(b"authorization", b"secret"), (b"x-a", b"1")]


def test_encode_literal_uses_the_static_name_index() -> None:
    assert encode_literal(b":path", b"/x") == b"\x04\x02/x"
    assert encode_literal(b"x", b"", never_indexed=True) == b"\x10\x01x\x00"
    long_value = b"v" * 300
    assert _fresh_decode(encode_literal(b"grpc-message", long_value)) == [(b"grpc-message", long_value)]


# ---------------------------------------------------------------- HeaderListTooLarge
@FAST
@given(pairs=header_lists, huffman=st.booleans(), table=st.sampled_from([0, 4096]),
       slack=st.integers(-40, 40))
def test_header_list_too_large_exactly_above_the_limit(pairs, huffman, table, slack) -> None:
    size = sum(len(n) + len(v) + 32 for n, v in _b(pairs))
    limit = max(1, size + slack)
    enc = Encoder()
    enc.header_table_size = table
    block = _encode(enc, pairs, huffman, [False] * 12)
    reader = HeaderReader(limit)
    if size > limit:
        with pytest.raises(HeaderListTooLarge) as err:
            reader.read(block)
        assert err.value.size == size and err.value.limit == limit
    else:
        hb = reader.read(block)
        assert hb.list_bytes == size or (huffman and not hb.decoded)  # see _check_block


@FAST
@given(specs=block_specs, limit=st.integers(60, 400), table=st.sampled_from([0, 4096]))
def test_a_rejected_list_leaves_the_hpack_state_right(specs, limit, table) -> None:
    enc = Encoder()
    enc.header_table_size = table
    ref = Decoder()
    reader = HeaderReader(limit)
    for pairs, huffman, sensitive in specs:
        block = _encode(enc, pairs, huffman, sensitive)
        expected = ref.decode(block, raw=True)
        size = sum(len(n) + len(v) + 32 for n, v in expected)
        if size > limit:
            with pytest.raises(HeaderListTooLarge):
                reader.read(block)
        else:
            _check_block(reader.read(block), pairs, expected, huffman)


def test_huffman_values_count_at_their_decoded_length() -> None:
    value = "a" * 1000  # 'a' is a 5-bit code: 625 bytes on the wire, 1000 in the list
    enc = Encoder()
    enc.header_table_size = 0
    block = _encode(enc, [("x-big", value)], True, [False])
    limit = 5 + 1000 + 32
    HeaderReader(limit).read(block)  # exactly at the limit: accepted
    with pytest.raises(HeaderListTooLarge):
        HeaderReader(limit - 1).read(block)


# ---------------------------------------------------------------- malformed blocks
def _lit(name: bytes, value: bytes, *, name_huffman: bool = False, value_huffman: bool = False) -> bytes:
    return (b"\x00" + bytes([(0x80 if name_huffman else 0) | len(name)]) + name
            + bytes([(0x80 if value_huffman else 0) | len(value)]) + value)


MALFORMED = {
    "truncated integer": b"\xff",
    "truncated integer continuation": b"\xff\x80",
    "truncated integer in a literal": b"\x0f",
    "integer overflow": b"\xff" + b"\xff" * 10 + b"\x01",
    "truncated name": b"\x00\x05ab",
    "missing value": b"\x00\x01a",
    "truncated value": b"\x00\x01a\x05ab",
    "truncated value after static name": b"\x04\x03/a",
    "index 0": b"\x80",
    "index 0 after a field": b"\x82\x80",
    "index past the tables": b"\xff\x40",
    "name index past the tables": b"\x0f\x80\x01\x01a",
    "indexed-name literal past the tables": b"\x7f\x50\x01a",
    "size update after a field": b"\x82\x20",
    "size update above 4096": b"\x3f\xe2\x1f",
    "bad huffman padding in a wanted value": b"\x04\x81\x00",
    "bad huffman padding in another value": _lit(b"x-custom", b"\x00", value_huffman=True),
    "bad huffman padding in a name": _lit(b"\x00", b"v", name_huffman=True),
    "huffman EOS in a value": _lit(b"x-custom", b"\xff\xff\xff\xff", value_huffman=True),
    "huffman EOS in a name": _lit(b"\xff\xff\xff\xff", b"v", name_huffman=True),
    "over-long huffman padding": _lit(b"x-custom", b"\x1f\xff", value_huffman=True),
}


@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("table", [0, 4096])
def test_malformed_blocks_raise_hpack_error(block: bytes, table: int) -> None:
    reader = HeaderReader(BIG)
    reader.table_size = table
    with pytest.raises(HpackError):
        reader.read(block)


def test_malformed_blocks_raise_hpack_error_after_dynamic_state() -> None:
    enc = Encoder()
    reader = HeaderReader(BIG)
    reader.read(enc.encode([("x-a", "1"), ("x-b", "2")]))
    for block in MALFORMED.values():
        with pytest.raises(HpackError):
            reader.read(block)


def _read_outcome(reader: HeaderReader, block: bytes) -> None:
    try:
        hb = reader.read(block)
    except (HpackError, HeaderListTooLarge):
        return
    hb.forwardable()
    hb.forwardable("5S")


def _prepared_reader(kind: int, limit: int) -> HeaderReader:
    reader = HeaderReader(limit)
    if kind == 1:
        reader.table_size = 0
    elif kind == 2:  # a reader with dynamic entries
        reader.read(Encoder().encode([("x-a", "1"), (":authority", "svc")]))
    return reader


@FAST
@given(block=st.binary(max_size=200), kind=st.integers(0, 2), limit=st.sampled_from([BIG, 1024]))
def test_random_bytes_raise_only_hpack_errors(block: bytes, kind: int, limit: int) -> None:
    _read_outcome(_prepared_reader(kind, limit), block)


def _mutated_blocks():
    valid = st.builds(lambda pairs, huffman, table: (_b(pairs), huffman, table),
                      header_lists, st.booleans(), st.sampled_from([0, 4096]))
    edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 2)),
                     min_size=1, max_size=4)
    return st.tuples(valid, edits)


def _apply(block: bytes, edits) -> bytes:
    buf = bytearray(block)
    for pos, byte, op in edits:
        if op == 0 and buf:
            buf[pos % len(buf)] = byte
        elif op == 1:
            buf.insert(pos % (len(buf) + 1), byte)
        elif buf:
            del buf[pos % len(buf):]
    return bytes(buf)


@FAST
@given(case=_mutated_blocks(), kind=st.integers(0, 2))
def test_mutated_valid_blocks_raise_only_hpack_errors(case, kind) -> None:
    (pairs, huffman, table), edits = case
    enc = Encoder()
    enc.header_table_size = table
    block = _apply(enc.encode(pairs, huffman=huffman), edits)
    assume(block)
    _read_outcome(_prepared_reader(kind, BIG), block)


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@FUZZ
@given(block=st.binary(max_size=400), kind=st.integers(0, 2), limit=st.sampled_from([BIG, 1024]))
def test_fuzz_random_bytes_raise_only_hpack_errors(block: bytes, kind: int, limit: int) -> None:
    _read_outcome(_prepared_reader(kind, limit), block)


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@FUZZ
@given(case=_mutated_blocks(), kind=st.integers(0, 2))
def test_fuzz_mutated_valid_blocks_raise_only_hpack_errors(case, kind) -> None:
    test_mutated_valid_blocks_raise_only_hpack_errors.hypothesis.inner_test(case, kind)


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@FUZZ
@given(specs=block_specs, table=st.sampled_from([0, 4096]))
def test_fuzz_header_lists_match_the_reference_decoder(specs, table) -> None:
    enc = Encoder()
    enc.header_table_size = table
    ref = Decoder()
    reader = HeaderReader(BIG)
    for pairs, huffman, sensitive in specs:
        block = _encode(enc, pairs, huffman, sensitive)
        _check_block(reader.read(block), pairs, ref.decode(block, raw=True), huffman)


# ---------------------------------------------------------------- per-call fields
TRACEPARENTS = st.builds(lambda t, s, f: f"00-{t:032x}-{s:016x}-{f:02x}",
                         st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.sampled_from([0, 1]))
per_call_lists = st.tuples(
    header_lists.map(lambda pairs: [p for p in pairs if p[0] not in PER_CALL_FIELDS]),
    st.none() | TRACEPARENTS, st.none() | st.from_regex(r"\A[0-9]{1,8}[HMSmun]\Z"),
    st.integers(0, 12), st.integers(0, 12), st.booleans(),
    st.none() | st.tuples(st.sampled_from(PER_CALL_FIELDS[2:]), st.uuids().map(str)),
    st.integers(0, 12),
)


def _with_per_call(case) -> tuple[list[tuple[str, str]], bool]:
    """The case's header list with its per-call fields inserted, and whether it has any."""
    pairs, traceparent, timeout, at_t, at_d, _huffman, other, at_o = case
    pairs = list(pairs)
    if timeout is not None:
        pairs.insert(at_d % (len(pairs) + 1), ("grpc-timeout", timeout))
    if traceparent is not None:
        pairs.insert(at_t % (len(pairs) + 1), ("traceparent", traceparent))
    if other is not None:
        pairs.insert(at_o % (len(pairs) + 1), other)
    return pairs, (traceparent, timeout, other) != (None, None, None)


@FAST
@given(case=per_call_lists)
def test_blocks_with_a_traceparent_or_a_deadline_read_as_the_full_scan_does(case) -> None:
    """The per-call fields (read apart from the cached rest of the block) give what scanning
    the whole block gives: fields, sizes, spans, and so the same forwarded bytes."""
    huffman = case[5]
    pairs, _ = _with_per_call(case)
    enc = Encoder()
    enc.header_table_size = 0
    block = _encode(enc, pairs, huffman, [False] * len(pairs))
    if block[0] & 0xE0 == 0x20:
        block = block[1:]  # the size update to 0 (the peer sent it before)
    reader = HeaderReader(BIG)
    reader.table_size = 0
    whole = reader._scan(block)
    for _ in range(2):  # the first read scans the rest, the second finds it cached
        hb = reader.read(block)
        assert hb.fields == whole.fields
        assert (hb.list_bytes, hb.timeout_span, hb.trace_spans, hb.strip_spans) == \
            (whole.list_bytes, whole.timeout_span, whole.trace_spans, whole.strip_spans)
        new_tp = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        assert hb.forwardable("77m", new_tp) == whole.forwardable("77m", new_tp)
        assert hb.forwardable() == whole.forwardable()
    _check_block(hb, pairs, Decoder().decode(block, raw=True), huffman)


@FAST
@given(case=per_call_lists, long_value=st.integers(0, 300))
def test_literal_blocks_take_the_light_walk_past_one_byte_integers(case, long_value) -> None:
    """Blocks of literals without indexing, as the sidecars and many callers encode them:
    static name indexes of 15 and more (``content-type``, ``user-agent``) and values of 127
    bytes or more (a bearer token) take multi-byte integers, and the light walk still finds
    the per-call fields, so such a block is known without the full scan, and reads as it."""
    listed, any_per_call = _with_per_call(case)
    pairs = [("content-type", "application/grpc"), ("user-agent", "grpc-python/1.6"),
             *listed, ("authorization", "Bearer " + "t" * long_value)]
    block = encode_block(pairs)
    reader = HeaderReader(BIG)
    reader.table_size = 0
    whole = reader._scan(block)
    hb = reader.known(block)
    if any_per_call and len(block) <= 1536:
        assert hb is not None
    if hb is not None:
        assert hb.fields == whole.fields
        assert (hb.list_bytes, hb.timeout_span, hb.trace_spans, hb.strip_spans) == \
            (whole.list_bytes, whole.timeout_span, whole.trace_spans, whole.strip_spans)
        assert hb.forwardable("9S", "00-" + "ef" * 16 + "-" + "12" * 8 + "-00") == \
            whole.forwardable("9S", "00-" + "ef" * 16 + "-" + "12" * 8 + "-00")


@pytest.mark.parametrize("name", ["traceparent", "grpc-timeout", "x-request-id", "x-b3-traceid",
                                  "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "b3",
                                  "tracestate", "baggage", "grpc-trace-bin", "uber-trace-id",
                                  "x-datadog-trace-id", "x-datadog-parent-id", "x-amzn-trace-id",
                                  "x-cloud-trace-context", "sentry-trace", "x-correlation-id",
                                  "x-client-trace-id"])
def test_a_field_new_on_every_call_adds_one_entry_to_the_scan_cache_not_one_per_call(
        name: str) -> None:
    """Blocks that differ only in a per-call field share one cached scan of the rest: the
    cache neither grows per call nor loses its other entries to them."""
    reader = HeaderReader(BIG)
    reader.table_size = 0
    base = [(":method", "POST"), (":path", "/a.B/C"), ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.6" + name)]
    headers_mod._SCANNED.clear()
    for i in range(50):
        value = f"00-{i + 1:032x}-{i + 1:016x}-01" if name == "traceparent" else \
            f"{i + 1}m" if name == "grpc-timeout" else f"{i:08x}-1111-4000-8000-{i:012x}"
        hb = reader.read(encode_block([*base[:2], (name, value), *base[2:]]))
        assert hb.get(":path") == "/a.B/C"
        if name in WANTED:
            assert hb.get(name) == value
        assert hb.lookup(name) == value
    # the rest once; a deadline alone also keeps its whole blocks (they repeat)
    assert len(headers_mod._SCANNED) == (51 if name == "grpc-timeout" else 1)


def test_two_traceparents_take_the_full_scan() -> None:
    pairs = [(":path", "/a.B/C"), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
             ("x-a", "b"), ("traceparent", "00-" + "3" * 32 + "-" + "4" * 16 + "-00")]
    block = encode_block(pairs)
    hb = HeaderReader(BIG).read(block)
    assert hb.get("traceparent") == pairs[1][1] and len(hb.trace_spans) == 2
    assert _fresh_decode(hb.forwardable(traceparent="00-" + "5" * 32 + "-" + "6" * 16 + "-01")) == \
        [(b":path", b"/a.B/C"), (b"traceparent", b"00-" + b"5" * 32 + b"-" + b"6" * 16 + b"-01"),
         (b"x-a", b"b")]
