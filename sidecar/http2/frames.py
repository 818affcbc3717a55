"""HTTP/2 frame constants and serialisers (RFC 9113). Pure functions over bytes."""

from __future__ import annotations

import struct

# Frame types
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

# Error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

# Settings identifiers
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
DEFAULT_MAX_FRAME_BYTES = 16384
MAX_FRAME_BYTES_LIMIT = (1 << 24) - 1
DEFAULT_WINDOW_BYTES = 65535
MAX_WINDOW_BYTES = (1 << 31) - 1

_HDR = struct.Struct(">HBBBL")
_U32 = struct.Struct(">L")
_RST = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header."""
    return _HDR.pack(length >> 8, length & 0xFF, ftype, flags, stream_id & 0x7FFFFFFF)


def parse_frame_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """Return (length, type, flags, stream_id) of the header at ``offset``; reserved bit masked."""
    hi, lo, ftype, flags, sid = _HDR.unpack_from(buf, offset)
    return (hi << 8) | lo, ftype, flags, sid & 0x7FFFFFFF


def data_frame(stream_id: int, payload: bytes | memoryview, end_stream: bool) -> bytes:
    return frame_header(len(payload), DATA, FLAG_END_STREAM if end_stream else 0, stream_id) + bytes(payload)


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame_bytes: int) -> bytes:
    """A HEADERS frame, split into CONTINUATION frames when the block exceeds the frame size."""
    flags = FLAG_END_STREAM if end_stream else 0
    if len(block) <= max_frame_bytes:
        return frame_header(len(block), HEADERS, flags | FLAG_END_HEADERS, stream_id) + block
    parts = [frame_header(max_frame_bytes, HEADERS, flags, stream_id), block[:max_frame_bytes]]
    pos = max_frame_bytes
    while pos < len(block):
        chunk = block[pos:pos + max_frame_bytes]
        pos += len(chunk)
        last = pos >= len(block)
        parts.append(frame_header(len(chunk), CONTINUATION, FLAG_END_HEADERS if last else 0, stream_id))
        parts.append(chunk)
    return b"".join(parts)


def rst_stream_frame(stream_id: int, error_code: int) -> bytes:
    return frame_header(4, RST_STREAM, 0, stream_id) + _RST.pack(error_code)


def settings_frame(settings: dict[int, int] | None = None, ack: bool = False) -> bytes:
    body = b"".join(_SETTING.pack(k, v) for k, v in (settings or {}).items())
    return frame_header(len(body), SETTINGS, FLAG_ACK if ack else 0, 0) + body


def ping_frame(opaque: bytes, ack: bool = False) -> bytes:
    return frame_header(8, PING, FLAG_ACK if ack else 0, 0) + opaque


def goaway_frame(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    body = _GOAWAY.pack(last_stream_id & 0x7FFFFFFF, error_code) + debug
    return frame_header(len(body), GOAWAY, 0, 0) + body


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment & 0x7FFFFFFF)


def unpack_u32(buf: bytes | memoryview, offset: int = 0) -> int:
    return _U32.unpack_from(buf, offset)[0]


def unpack_setting(buf: bytes | memoryview, offset: int) -> tuple[int, int]:
    return _SETTING.unpack_from(buf, offset)


def unpack_goaway(buf: bytes | memoryview) -> tuple[int, int]:
    last, code = _GOAWAY.unpack_from(buf, 0)
    return last & 0x7FFFFFFF, code
