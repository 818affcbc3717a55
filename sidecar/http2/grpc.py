"""The few gRPC-over-HTTP/2 rules the relay needs: status codes, messages, timeouts, framing."""

from __future__ import annotations

from .headers import encode_block

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAVAILABLE = 14
UNIMPLEMENTED = 12

STATUS_NAMES: dict[int, str] = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
"""gRPC status code -> its canonical name."""

_TIMEOUT_UNITS_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float | None:
    """``grpc-timeout`` (e.g. ``100m``) in seconds; None when malformed (ignored, as gRPC does)."""
    if not 2 <= len(value) <= 9:
        return None
    digits, unit = value[:-1], value[-1]
    if not (digits.isascii() and digits.isdigit()) or unit not in _TIMEOUT_UNITS_S:
        return None
    return int(digits) * _TIMEOUT_UNITS_S[unit]


def format_timeout(seconds: float) -> str:
    """The shortest exact-enough ``grpc-timeout`` for ``seconds`` (at most 8 digits)."""
    if seconds <= 0:
        return "1n"
    micros = int(seconds * 1e6)
    if micros < 100_000_000:
        return f"{max(micros, 1)}u"
    millis = int(seconds * 1e3)
    if millis < 100_000_000:
        return f"{millis}m"
    return f"{min(int(seconds), 99_999_999)}S"


def percent_encode(message: str) -> str:
    """grpc-message encoding: bytes outside printable ASCII, and '%', as %XX."""
    out = []
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return "".join(out)


def percent_decode(value: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == "%" and _is_hex(value[i + 1:i + 3]):
            raw.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            raw += c.encode("latin-1", "replace")
            i += 1
    return raw.decode("utf-8", "replace")


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in s)


def trailers_only_block(status: int, message: str) -> bytes:
    """A complete trailers-only response: HTTP 200 with the gRPC status."""
    return encode_block([(":status", "200"), ("content-type", "application/grpc"),
                         ("grpc-status", str(status)), ("grpc-message", percent_encode(message))])


def trailers_block(status: int, message: str) -> bytes:
    """Trailers after response headers were sent."""
    return encode_block([("grpc-status", str(status)), ("grpc-message", percent_encode(message))])


class MessageMeter:
    """Counts gRPC length-prefixed messages in a DATA stream without copying them.

    ``feed`` returns the announced length of the first message over ``limit_bytes``, or -1.
    Work is per message prefix, never per payload byte.
    """

    __slots__ = ("limit", "remaining", "prefix", "messages")

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.remaining = 0
        self.prefix = b""
        self.messages = 0

    def feed(self, data: bytes) -> int:
        n = len(data)
        if not self.remaining and not self.prefix and n >= 5:
            length = int.from_bytes(data[1:5], "big")
            if n == 5 + length:  # the common case: one whole message in the frame
                self.messages += 1
                return length if length > self.limit else -1
        pos = 0
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                self.remaining -= take
                pos += take
                continue
            need = 5 - len(self.prefix)
            self.prefix += data[pos:pos + need]
            pos += need
            if len(self.prefix) == 5:
                length = int.from_bytes(self.prefix[1:5], "big")
                self.prefix = b""
                self.messages += 1
                if length > self.limit:
                    return length
                self.remaining = length
        return -1
