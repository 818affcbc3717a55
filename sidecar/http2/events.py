"""Events the connection core reports to its owner (the relay). Plain slotted values."""

from __future__ import annotations

from .headers import HeaderBlock


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({vals})"


class HeadersReceived(Event):
    """A complete header block on a stream. ``first`` marks request (server role) or response
    (client role) headers; a later block is trailers."""

    __slots__ = ("stream_id", "headers", "end_stream", "first")

    def __init__(self, stream_id: int, headers: HeaderBlock, end_stream: bool, first: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream
        self.first = first


class HeadersRejected(Event):
    """A header block over SETTINGS_MAX_HEADER_LIST_SIZE; the stream is still open."""

    __slots__ = ("stream_id", "reason", "first")

    def __init__(self, stream_id: int, reason: str, first: bool) -> None:
        self.stream_id = stream_id
        self.reason = reason
        self.first = first


class DataReceived(Event):
    """Payload of a DATA frame (padding removed). The owner returns credit with ``ack_data``."""

    __slots__ = ("stream_id", "data", "end_stream")

    def __init__(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.end_stream = end_stream


class DataSent(Event):
    """``sent`` bytes queued earlier by ``send_data`` went out on the wire."""

    __slots__ = ("stream_id", "sent")

    def __init__(self, stream_id: int, sent: int) -> None:
        self.stream_id = stream_id
        self.sent = sent


class StreamReset(Event):
    """The stream ended abnormally: reset by the peer, or refused/unprocessed (GOAWAY)."""

    __slots__ = ("stream_id", "error_code", "unprocessed")

    def __init__(self, stream_id: int, error_code: int, unprocessed: bool = False) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.unprocessed = unprocessed


class StreamEnded(Event):
    """Both directions of the stream are closed normally; it is forgotten."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class GoAwayReceived(Event):
    __slots__ = ("last_stream_id", "error_code", "debug")

    def __init__(self, last_stream_id: int, error_code: int, debug: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.debug = debug


class PingAcked(Event):
    __slots__ = ("opaque",)

    def __init__(self, opaque: bytes) -> None:
        self.opaque = opaque


class SettingsChanged(Event):
    """The peer's settings changed (e.g. its stream limit): capacity may have moved."""

    __slots__ = ()


class ConnectionTerminated(Event):
    """The connection is over (our GOAWAY after a protocol error, or the peer's final one).
    Every stream still open on it is dead; the transport should close after flushing."""

    __slots__ = ("error_code", "reason")

    def __init__(self, error_code: int, reason: str) -> None:
        self.error_code = error_code
        self.reason = reason
