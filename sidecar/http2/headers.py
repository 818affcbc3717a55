"""Header blocks: scan context-free HPACK blocks, decode the rest, splice and encode literals.

We advertise SETTINGS_HEADER_TABLE_SIZE=0, so a compliant peer sends blocks that reference
only the static table. Such a block is *scanned*: the few fields the relay needs are read
(``:authority``, ``:path``, ``:status``, ``grpc-status``, ``grpc-message``, ``grpc-timeout``,
``te``, ``traceparent``) and the block is forwarded verbatim. Any other block (one that uses
the dynamic table, typically sent before the peer saw our SETTINGS) is decoded with the
``hpack`` library, which keeps that connection's table right, and re-encoded as literals, so
what we forward never depends on a dynamic table. ``forwardable`` splices in a new
``grpc-timeout`` and ``traceparent``. A block that ends with the ``traceparent`` a sidecar
appends, or that carries fields new on every call (``PER_CALL_FIELDS``: a caller's
``traceparent``, ``grpc-timeout``, request ids, other tracers' ids; found by a light walk
that decodes nothing), is read as the cached scan of the rest plus those fields
(``HeaderReader.known``), so per-call ids and deadlines cost no full scan. Pure code, no I/O.
"""

from __future__ import annotations

from operator import itemgetter

from hpack import Decoder, HPACKError, NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.table import HeaderTable

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
STATIC_NAMES: tuple[str, ...] = tuple(n.decode() for n, _ in STATIC_TABLE)
_STATIC_INDEX: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(STATIC_TABLE, start=1):
    _STATIC_INDEX.setdefault(_n, _i)

WANTED = frozenset(
    {":authority", ":path", ":method", ":status", "grpc-status", "grpc-message", "grpc-timeout",
     "te", "traceparent", "content-type"}
)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_ENTRY_OVERHEAD = 32
_START = itemgetter(0)  # an edit's start offset
_HUFFMAN_MAX_EXPANSION = 8 / 5  # shortest Huffman code is 5 bits
_HUFFMAN_ENCODER = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


class HpackError(Exception):
    """A malformed header block: the connection must end with COMPRESSION_ERROR."""


class HeaderListTooLarge(Exception):
    """The decoded header list exceeds SETTINGS_MAX_HEADER_LIST_SIZE: fail that stream only."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"header list of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class HeaderBlock:
    """One received header block: the bytes to forward and the fields the relay looks at.

    ``timeout_span`` and ``trace_spans`` are the byte ranges in ``block`` of the (last)
    ``grpc-timeout`` field and of every ``traceparent`` field (in order), so ``forwardable``
    can replace them without decoding the block again."""

    __slots__ = ("block", "fields", "list_bytes", "timeout_span", "strip_spans", "decoded",
                 "trace_spans", "_others")

    def __init__(self, block: bytes, fields: dict[str, str], list_bytes: int,
                 timeout_span: tuple[int, int] | None, strip_spans: list[tuple[int, int]],
                 decoded: bool, trace_spans: tuple[tuple[int, int], ...] = ()) -> None:
        self.block = block
        self.fields = fields
        self.list_bytes = list_bytes
        self.timeout_span = timeout_span
        self.strip_spans = strip_spans
        self.decoded = decoded
        self.trace_spans = trace_spans
        self._others: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        return self.fields.get(name)

    def lookup(self, name: str) -> str | None:
        """The value of field ``name`` (lower-case), any field, not only those in ``fields``:
        the first occurrence, or None. The first lookup of a field outside ``WANTED`` reads
        the whole block once (it references only the static table, so it reads without HPACK
        state) and keeps the result on the block, which equal blocks share; never raises for
        a block the reader accepted."""
        if name in WANTED:
            return self.fields.get(name)
        others = self._others
        if others is None:
            others = self._others = _other_fields(self.block)
        return others.get(name)

    def forwardable(self, grpc_timeout: str | None = None,
                    traceparent: str | None = None) -> bytes:
        """The block to send on: hop-by-hop fields removed, ``grpc-timeout`` replaced by
        ``grpc_timeout`` when given (and left as received when None), and ``traceparent``
        (a latin-1 string) in place of the received ``traceparent`` when given: exactly one
        such field, where the first received one was (every other one removed), or appended
        when the block had none. Returns ``block`` itself, not a copy, when nothing changes."""
        if grpc_timeout is None and not self.strip_spans:
            if traceparent is None:
                return self.block
            if not self.trace_spans:  # the common case of a new trace: one append
                return self.block + _traceparent_literal(traceparent)
        edits: list[tuple[int, int, bytes]] = [(s, e, b"") for s, e in self.strip_spans]
        end = len(self.block)
        if grpc_timeout is not None:
            lit = encode_literal(b"grpc-timeout", grpc_timeout.encode())
            s, e = self.timeout_span if self.timeout_span is not None else (end, end)
            edits.append((s, e, lit))
        if traceparent is not None:
            lit = _traceparent_literal(traceparent)
            spans = self.trace_spans
            if spans:
                s, e = spans[0]
                edits.append((s, e, lit))
                edits.extend((s, e, b"") for s, e in spans[1:])
            else:
                edits.append((end, end, lit))
        if not edits:
            return self.block
        edits.sort(key=_START)  # stable: appends at the end keep their order
        out = bytearray()
        pos = 0
        for s, e, repl in edits:
            out += self.block[pos:s]
            out += repl
            pos = e
        out += self.block[pos:]
        return bytes(out)


def _int(buf: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    mask = (1 << prefix_bits) - 1
    value = buf[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise HpackError("truncated integer")
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("integer overflow")


def _string(buf: bytes, pos: int) -> tuple[int, int, bool]:
    """Return (start, end, huffman) of the string literal at ``pos``."""
    if pos >= len(buf):
        raise HpackError("truncated string")
    huffman = bool(buf[pos] & 0x80)
    length, pos = _int(buf, pos, 7)
    end = pos + length
    if end > len(buf):
        raise HpackError("string runs past the block")
    return pos, end, huffman


def _text(buf: bytes, start: int, end: int, huffman: bool) -> str:
    raw = buf[start:end]
    if huffman:
        raw = _huffman(raw)
    return raw.decode("latin-1")


_BYTE_STEPS: dict[int, tuple[int, bytes, int]] = {}
"""(decoder state << 8 | input byte) -> (next state, symbols emitted, flags of the second
nibble or HUFFMAN_FAIL): hpack's nibble table taken a byte at a time, filled as bytes are
seen (at most ``_MAX_BYTE_STEPS`` entries; past that, steps are worked out each time)."""
_MAX_BYTE_STEPS = 8192


def _byte_step(state: int, byte: int) -> tuple[int, bytes, int]:
    out = bytearray()
    flags = 0
    for nibble in (byte >> 4, byte & 0x0F):
        state, flags, symbol = HUFFMAN_TABLE[state * 16 + nibble]
        if flags & HUFFMAN_FAIL:
            return state, b"", HUFFMAN_FAIL
        if flags & HUFFMAN_EMIT_SYMBOL:
            out.append(symbol)
    return state, bytes(out), flags


def _huffman(raw: bytes) -> bytes:
    """HPACK Huffman decoding (RFC 7541 §5.2), as ``hpack.huffman_table.decode_huffman``
    but a byte per step; raises HpackError for an invalid or incomplete string."""
    if not raw:
        return b""
    steps = _BYTE_STEPS
    state = 0
    flags = 0
    out = bytearray()
    for byte in raw:
        key = state << 8 | byte
        step = steps.get(key)
        if step is None:
            step = _byte_step(state, byte)
            if len(steps) < _MAX_BYTE_STEPS:
                steps[key] = step
        state, symbols, flags = step
        if flags & HUFFMAN_FAIL:
            raise HpackError("bad Huffman string: invalid code")
        out += symbols
    if not flags & HUFFMAN_COMPLETE:
        raise HpackError("bad Huffman string: incomplete")
    return bytes(out)


def encode_int(value: int, prefix_bits: int, first: int) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes([first | value])
    out = bytearray([first | mask])
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_literal(name: bytes, value: bytes, never_indexed: bool = False) -> bytes:
    """A literal field without indexing (or never-indexed), context-free for any decoder."""
    first = 0x10 if never_indexed else 0x00
    idx = _STATIC_INDEX.get(name)
    if idx is not None:
        head = encode_int(idx, 4, first)
    else:
        head = bytes([first]) + encode_int(len(name), 7, 0) + name
    return head + encode_int(len(value), 7, 0) + value


_TRACEPARENT_HEAD = encode_literal(b"traceparent", b"")[:-1]  # all but the value's length


def _traceparent_literal(value: str) -> bytes:
    """``encode_literal(b"traceparent", value)``, with the name's bytes made once."""
    raw = value.encode("latin-1")
    return _TRACEPARENT_HEAD + encode_int(len(raw), 7, 0) + raw


_OUR_TRACEPARENT_HEAD = _TRACEPARENT_HEAD + encode_int(55, 7, 0)
"""The start of the literal a sidecar adds: ``traceparent`` with a 55-character value."""
_OUR_TRACEPARENT_BYTES = len(_OUR_TRACEPARENT_HEAD) + 55
_OUR_TRACEPARENT_LIST_BYTES = len("traceparent") + 55 + _ENTRY_OVERHEAD


def encode_block(fields: list[tuple[str, str]]) -> bytes:
    """Encode fields as context-free literals (no Huffman, no indexing)."""
    return b"".join(encode_literal(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields)


_CACHE_ENTRIES = 512
_CACHE_MAX_BLOCK_BYTES = 1024
_SCANNED: dict[bytes, tuple[int, HeaderBlock]] = {}
"""Context-free blocks already scanned (requests and trailers repeat byte for byte)."""


def _remember(block: bytes, max_list_bytes: int, hb: HeaderBlock) -> None:
    """Keep ``block``'s scan (made under ``max_list_bytes``); the cache starts over when full."""
    if len(_SCANNED) >= _CACHE_ENTRIES:
        _SCANNED.clear()
    _SCANNED[block] = (max_list_bytes, hb)


class HeaderReader:
    """Decoder-side HPACK state for the blocks one peer sends on one connection."""

    __slots__ = ("max_list_bytes", "table_size", "_decoder")

    def __init__(self, max_list_bytes: int) -> None:
        self.max_list_bytes = max_list_bytes
        self.table_size = 4096  # the peer's table size in effect until it sends an update
        self._decoder: Decoder | None = None

    def read(self, block: bytes) -> HeaderBlock:
        """Scan (or decode) one complete header block.

        Raises HpackError for a malformed block (connection error) and HeaderListTooLarge
        when the list is over the limit (stream error; the HPACK state stays right).
        """
        if self.table_size == 0:
            hb = self.known(block)
            if hb is not None:
                return hb
            cacheable = len(block) <= _CACHE_MAX_BLOCK_BYTES
        else:
            cacheable = False
        try:
            hb = self._scan(block)
        except _NeedsDecoder:
            return self._decode(block)
        if cacheable and self.table_size == 0 and not hb.trace_spans:
            # Same bytes under an empty table always scan the same: share the result (not
            # for a block with a traceparent: one per call, it would only churn the cache).
            _remember(block, self.max_list_bytes, hb)
        return hb

    def cached(self, block: bytes) -> HeaderBlock | None:
        """What ``read`` returns for ``block`` when its scan is in the cache (a peer that
        uses no dynamic table sends it again byte for byte), else None; nothing changes."""
        hit = _SCANNED.get(block)
        if hit is not None and hit[0] == self.max_list_bytes:
            return hit[1]
        return None

    def known(self, block: bytes) -> HeaderBlock | None:
        """What ``read`` returns for ``block`` when it is known by its bytes, under an empty
        table: in the scan cache, or a cached block plus per-call fields (the traceparent a
        sidecar appends: ``_with_our_traceparent``; ``PER_CALL_FIELDS``:
        ``_with_per_call_fields``); else None, and then only the full scan can tell. Raises
        nothing; the reader's state is as ``read`` would leave it (the scan cache may gain
        the block's repeating part)."""
        hb = self.cached(block)
        if hb is not None or self.table_size != 0:
            return hb
        n = len(block)
        if n > _OUR_TRACEPARENT_BYTES:
            hb = self._with_our_traceparent(block)
            if hb is not None:
                return hb
        if n <= _CACHE_MAX_BLOCK_BYTES + _MAX_PER_CALL_BYTES:
            return self._with_per_call_fields(block)
        return None

    def _with_our_traceparent(self, block: bytes) -> HeaderBlock | None:
        """What ``_scan`` gives for ``block`` when it ends with the literal a sidecar appends
        (``traceparent``, a 55-character value, no Huffman): the rest is a block requests
        repeat byte for byte, found in (or added to) the scan cache, and only the traceparent
        is new per call. None when the block does not end so, or when anything about it
        wants the full scan (another traceparent, a list near its limit, a head that does
        not scan on its own: then the tail was not a field of its own)."""
        n = len(block)
        cut = n - _OUR_TRACEPARENT_BYTES
        if not block.startswith(_OUR_TRACEPARENT_HEAD, cut):
            return None
        head = block[:cut]
        base = self._scan_cached(head)
        # Huffman strings count at most 8/5 of their wire length: past this bound the exact
        # size is the full scan's business.
        if base is None or base.trace_spans or (base.list_bytes + len(head) + _OUR_TRACEPARENT_LIST_BYTES
                                > self.max_list_bytes):
            return None
        fields = dict(base.fields)
        fields["traceparent"] = block[n - 55:].decode("latin-1")
        return HeaderBlock(block, fields, base.list_bytes + _OUR_TRACEPARENT_LIST_BYTES,
                           base.timeout_span, base.strip_spans, False, ((cut, n),))

    def _with_per_call_fields(self, block: bytes) -> HeaderBlock | None:
        """What ``_scan`` gives for ``block`` when it carries fields that differ on every
        call (``PER_CALL_FIELDS``: a ``traceparent``, a ``grpc-timeout``, request and
        trace ids; one of each at most): the rest of the block, with those cut out, is one requests
        repeat byte for byte, found in (or added to) the scan cache; only those values are
        read per call. None when the block has none, or anything the light walk
        (``_per_call_spans``) does not follow: then the full scan judges it."""
        spans = _per_call_spans(block)
        if not spans:
            return None
        parts: list[bytes] = []
        pos = 0
        for _name, s, e, _vs, _ve, _vh in spans:
            parts.append(block[pos:s])
            pos = e
        parts.append(block[pos:])
        base = self._scan_cached(b"".join(parts))
        if base is None or base.trace_spans or base.timeout_span is not None:
            return None  # the walk missed a field the scan saw: let the full scan judge
        fields = dict(base.fields)
        list_bytes = base.list_bytes
        timeout_span: tuple[int, int] | None = None
        trace_spans: tuple[tuple[int, int], ...] = ()
        repeats = True  # a deadline alone repeats; an id never does
        for name, s, e, vs, ve, vh in spans:
            try:  # decoded: a bad Huffman string must not be forwarded (see _scan)
                value = _text(block, vs, ve, vh)
            except HpackError:
                return None
            list_bytes += len(name) + (ve - vs) + _ENTRY_OVERHEAD  # counted as _scan does
            if name == "traceparent":
                fields[name] = value
                trace_spans = ((s, e),)
                repeats = False
            elif name == "grpc-timeout":
                fields[name] = value
                timeout_span = (s, e)
            else:
                repeats = False
        if list_bytes * _HUFFMAN_MAX_EXPANSION > self.max_list_bytes:
            return None  # near the limit: the exact size is the full scan's business
        strip = [(_shifted(a, spans, True), _shifted(b, spans, False)) for a, b in base.strip_spans]
        hb = HeaderBlock(block, fields, list_bytes, timeout_span, strip, False, trace_spans)
        if repeats and len(block) <= _CACHE_MAX_BLOCK_BYTES:
            # A deadline alone repeats (a fixed timeout, or a countdown's few values): keep
            # the whole block too, so it hits the cache at once next time.
            _remember(block, self.max_list_bytes, hb)
        return hb

    def _scan_cached(self, head: bytes) -> HeaderBlock | None:
        """The scan of ``head`` (the part of a block that requests repeat byte for byte),
        from the scan cache or made and kept there; None when it does not scan on its own."""
        base = self.cached(head)
        if base is not None:
            return base
        try:
            base = self._scan(head)
        except (_NeedsDecoder, HpackError, HeaderListTooLarge):
            return None
        if len(head) <= _CACHE_MAX_BLOCK_BYTES and not base.trace_spans:
            _remember(head, self.max_list_bytes, base)
        return base

    def _scan(self, buf: bytes) -> HeaderBlock:
        fields: dict[str, str] = {}
        strip: list[tuple[int, int]] = []
        timeout_span: tuple[int, int] | None = None
        trace_spans: tuple[tuple[int, int], ...] = ()
        list_bytes = 0
        huffman_bytes = 0
        pos = 0
        n = len(buf)
        first = True
        while pos < n:
            start = pos
            b = buf[pos]
            if b & 0x80:  # indexed field
                idx, pos = _int(buf, pos, 7)
                if idx == 0:
                    raise HpackError("index 0")
                if idx > 61:
                    raise _NeedsDecoder
                name_b, value_b = STATIC_TABLE[idx - 1]
                list_bytes += len(name_b) + len(value_b) + _ENTRY_OVERHEAD
                name = STATIC_NAMES[idx - 1]
                if name in WANTED and name not in fields:
                    fields[name] = value_b.decode("latin-1")
                elif name in HOP_BY_HOP:  # e.g. static 57, "transfer-encoding: ''"
                    strip.append((start, pos))
                first = False
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                if not first:
                    raise _NeedsDecoder  # let hpack judge odd placements
                size, pos = _int(buf, pos, 5)
                if size > 4096:
                    raise HpackError(f"table size update to {size} exceeds 4096")
                if size != 0:
                    raise _NeedsDecoder
                self.table_size = 0
                if self._decoder is not None:
                    self._decoder.header_table.maxsize = 0
                continue
            if b & 0xC0 == 0x40:  # literal with incremental indexing
                if self.table_size != 0:
                    raise _NeedsDecoder
                prefix = 6
            else:  # literal without indexing (0000) or never indexed (0001)
                prefix = 4
            first = False
            idx, pos = _int(buf, pos, prefix)
            if idx:
                if idx > 61:
                    raise _NeedsDecoder
                name_b = STATIC_TABLE[idx - 1][0]
                name = STATIC_NAMES[idx - 1]
                name_len = len(name_b)
            else:
                ns, ne, nh = _string(buf, pos)
                pos = ne
                name = _text(buf, ns, ne, nh) if nh else buf[ns:ne].decode("latin-1")
                name_len = len(name)
            vs, ve, vh = _string(buf, pos)
            pos = ve
            if vh:
                huffman_bytes += ve - vs
                # Forwarded verbatim, a bad Huffman string would fail the upstream connection
                # (COMPRESSION_ERROR) and every stream on it: check each one here.
                _text(buf, vs, ve, vh)
            list_bytes += name_len + (ve - vs) + _ENTRY_OVERHEAD
            if name in WANTED:
                if name not in fields:
                    fields[name] = _text(buf, vs, ve, vh)
                if name == "grpc-timeout":
                    timeout_span = (start, pos)
                elif name == "traceparent":
                    trace_spans += ((start, pos),)
                elif name == "te" and _text(buf, vs, ve, vh) != "trailers":
                    strip.append((start, pos))
            elif name in HOP_BY_HOP:
                strip.append((start, pos))
        if list_bytes + int(huffman_bytes * (_HUFFMAN_MAX_EXPANSION - 1)) > self.max_list_bytes:
            exact = self._exact_size(buf)
            if exact > self.max_list_bytes:
                raise HeaderListTooLarge(exact, self.max_list_bytes)
            list_bytes = exact
        return HeaderBlock(buf, fields, list_bytes, timeout_span, strip, False, trace_spans)

    def _exact_size(self, buf: bytes) -> int:
        size = 0
        for name, value in self._decode_fields(buf):
            size += len(name) + len(value) + _ENTRY_OVERHEAD
        return size

    def _decode_fields(self, buf: bytes) -> list:
        if self._decoder is None:
            self._decoder = Decoder(max_header_list_size=1 << 30)
            self._decoder.max_allowed_table_size = 4096
            self._decoder.header_table.maxsize = self.table_size
        try:
            return self._decoder.decode(buf, raw=True)
        except HPACKError as exc:
            raise HpackError(str(exc) or exc.__class__.__name__) from exc

    def _decode(self, buf: bytes) -> HeaderBlock:
        headers = self._decode_fields(buf)
        self.table_size = self._decoder.header_table.maxsize if self._decoder else self.table_size
        size = sum(len(h[0]) + len(h[1]) + _ENTRY_OVERHEAD for h in headers)
        if size > self.max_list_bytes:
            raise HeaderListTooLarge(size, self.max_list_bytes)
        fields: dict[str, str] = {}
        out: list[bytes] = []
        timeout_span: tuple[int, int] | None = None
        trace_spans: tuple[tuple[int, int], ...] = ()
        pos = 0
        for h in headers:
            name_b, value_b = bytes(h[0]), bytes(h[1])
            name = name_b.decode("latin-1")
            if name in WANTED and name not in fields:  # as _scan reports it, even a stripped te
                fields[name] = value_b.decode("latin-1")
            if name in HOP_BY_HOP or (name == "te" and value_b != b"trailers"):
                continue
            enc = encode_literal(name_b, value_b, isinstance(h, NeverIndexedHeaderTuple))
            if name == "grpc-timeout":
                timeout_span = (pos, pos + len(enc))
            elif name == "traceparent":
                trace_spans += ((pos, pos + len(enc)),)
            out.append(enc)
            pos += len(enc)
        return HeaderBlock(b"".join(out), fields, size, timeout_span, [], True, trace_spans)


def _other_fields(buf: bytes) -> dict[str, str]:
    """The first value of every field of a forwardable block (static-table references and
    literals only, as ``HeaderReader`` leaves them) whose name is not in ``WANTED``."""
    out: dict[str, str] = {}
    pos, n = 0, len(buf)
    while pos < n:
        b = buf[pos]
        if b & 0x80:  # indexed: a static entry
            idx, pos = _int(buf, pos, 7)
            name_b, value_b = STATIC_TABLE[idx - 1]
            name = STATIC_NAMES[idx - 1]
            if name not in WANTED and name not in out:
                out[name] = value_b.decode("latin-1")
            continue
        if b & 0xE0 == 0x20:  # table size update (to 0)
            _, pos = _int(buf, pos, 5)
            continue
        idx, pos = _int(buf, pos, 6 if b & 0xC0 == 0x40 else 4)
        if idx:
            name = STATIC_NAMES[idx - 1]
        else:
            ns, ne, nh = _string(buf, pos)
            pos = ne
            name = _text(buf, ns, ne, nh)
        vs, ve, vh = _string(buf, pos)
        pos = ve
        if name not in WANTED and name not in out:
            out[name] = _text(buf, vs, ve, vh)
    return out


PER_CALL_FIELDS = ("traceparent", "grpc-timeout", "x-request-id", "x-b3-traceid",
                   "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "b3", "tracestate",
                   "baggage", "grpc-trace-bin", "uber-trace-id", "x-datadog-trace-id",
                   "x-datadog-parent-id", "x-amzn-trace-id", "x-cloud-trace-context",
                   "sentry-trace", "x-correlation-id", "x-client-trace-id")
"""Fields whose values change on every call, read apart from the rest of a block, which
repeats: a deadline; W3C trace context and baggage; B3 (Zipkin), Jaeger, Datadog, AWS X-Ray,
Google Cloud, OpenCensus (``grpc-trace-bin``) and Sentry trace ids; the request and
correlation ids proxies such as Envoy add."""
_PER_CALL_NAMES = {k.encode(): k for k in PER_CALL_FIELDS}
_PER_CALL_NAMES.update({_HUFFMAN_ENCODER.encode(k): v for k, v in list(_PER_CALL_NAMES.items())})
"""The literal names, raw and Huffman-coded (the code is canonical), of ``PER_CALL_FIELDS``."""

_MAX_PER_CALL_BYTES = 512
"""What the per-call fields may add to a block the scan cache would take."""

PerCallSpan = tuple[str, int, int, int, int, bool]
"""(name, field start, field end, value start, value end, value Huffman-coded?)."""


def _per_call_spans(buf: bytes) -> list[PerCallSpan] | None:
    """The literals of ``PER_CALL_FIELDS`` in a block that references only the
    static table, in block order, found without decoding anything; None when there are
    none, two of a name, or anything else this light walk does not follow (a table size
    update, an index past the static table, a malformed representation). One-byte integers
    (indexes below 15 or 63, strings under 127 bytes) are read inline, longer ones with
    ``_int``: this runs on every call."""
    found: list[PerCallSpan] = []
    pos, n = 0, len(buf)
    names = _PER_CALL_NAMES
    try:
        while pos < n:
            start = pos
            b = buf[pos]
            if b & 0x80:  # indexed field: a static entry
                if b == 0xFF:
                    idx, pos = _int(buf, pos, 7)
                else:
                    idx = b & 0x7F
                    pos += 1
                if not 0 < idx <= 61:
                    return None
                continue
            if b & 0xE0 == 0x20:  # table size update
                return None
            mask = 0x3F if b & 0xC0 == 0x40 else 0x0F
            if b & mask == mask:
                idx, pos = _int(buf, pos, 6 if mask == 0x3F else 4)
            else:
                idx = b & mask
                pos += 1
            if idx > 61:
                return None
            name = None
            if not idx:  # a literal name
                if pos >= n:
                    return None
                if buf[pos] & 0x7F == 0x7F:
                    nlen, ns = _int(buf, pos, 7)
                else:
                    nlen, ns = buf[pos] & 0x7F, pos + 1
                pos = ns + nlen
                name = names.get(buf[ns:pos])
            if pos >= n:
                return None
            vh = bool(buf[pos] & 0x80)
            if buf[pos] & 0x7F == 0x7F:
                vlen, vs = _int(buf, pos, 7)
            else:
                vlen, vs = buf[pos] & 0x7F, pos + 1
            pos = vs + vlen
            if pos > n:
                return None
            if name is not None:
                if any(f[0] == name for f in found):
                    return None
                found.append((name, start, pos, vs, pos, vh))
    except HpackError:  # a truncated or oversized integer
        return None
    return found or None


def _shifted(offset: int, cuts: list[PerCallSpan], start: bool) -> int:
    """``offset`` in a block with ``cuts`` removed, as an offset in the whole block: a field
    start moves past a cut made at it, a field end does not."""
    for _name, s, e, _vs, _ve, _vh in cuts:
        if offset > s or (start and offset == s):
            offset += e - s
        else:
            break
    return offset


class _NeedsDecoder(Exception):
    """Internal: the block references state the scanner does not keep."""
