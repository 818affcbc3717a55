"""Data-path limits with safe defaults. Every bound on memory or work per peer lives here."""

from __future__ import annotations

from dataclasses import dataclass, fields

MiB = 1 << 20
KiB = 1 << 10


@dataclass(frozen=True, slots=True)
class Limits:
    """Immutable limits for one sidecar. Units are in the names (bytes, s)."""

    max_message_bytes: int = 4 * MiB
    """Largest gRPC message relayed either way; over it the call gets RESOURCE_EXHAUSTED."""
    max_frame_bytes: int = 64 * KiB
    """SETTINGS_MAX_FRAME_SIZE we advertise: the largest frame a peer may send us (larger
    frames mean fewer per-frame steps for big messages; the input buffer holds one frame)."""
    max_header_list_bytes: int = 16 * KiB
    """SETTINGS_MAX_HEADER_LIST_SIZE (RFC 7541 sizes: name + value + 32 per field)."""
    max_concurrent_streams: int = 256
    """Streams a peer may open on one connection to us."""
    max_connections: int = 1024
    """Downstream connections per listener, counted from accept (TLS handshakes in progress
    included); further ones are closed at once (``max_connections``)."""
    max_connections_per_peer: int = 128
    """Downstream connections per listener from one peer IP address, counted from accept;
    further ones from that address are closed at once (``max_connections_per_peer``). Below
    ``max_connections``, so one peer's flood is refused before it can take the total."""
    handshake_timeout_s: float = 10.0
    """A downstream connection must finish its TLS handshake and send the HTTP/2 preface
    (client magic and first SETTINGS) within this; else it is closed (``handshake_timeout``)."""
    max_resets_per_s: int = 200
    """Stream resets on one connection per second: RST_STREAM frames the peer sends, ours for
    its stream errors, and streams refused over ``max_concurrent_streams`` once it has our
    SETTINGS; over it the connection gets GOAWAY ENHANCE_YOUR_CALM (``rapid_reset``,
    CVE-2023-44487 and its provoked-reset variant)."""
    max_control_frames_per_s: int = 200
    """PING, SETTINGS (not ACK), PRIORITY, GOAWAY and unknown-type frames, and ACKs of
    nothing we sent, a peer may send on one connection per second; WINDOW_UPDATE frames count
    too beyond ten per DATA frame we sent or stream opened in that second, and a
    PING after DATA we sent since its last PING (gRPC's BDP probe) is free. Over it GOAWAY
    ENHANCE_YOUR_CALM (``control_flood``)."""
    max_empty_frames_per_s: int = 100
    """DATA frames with no payload and no END_STREAM, and empty CONTINUATION frames, a peer
    may send on one connection per second; over it GOAWAY ENHANCE_YOUR_CALM
    (``empty_frame_flood``)."""
    max_continuation_frames: int = 32
    """CONTINUATION frames in one header block; over it GOAWAY ENHANCE_YOUR_CALM
    (``continuation_flood``). The block's bytes are also capped at twice
    ``max_header_list_bytes``."""
    stall_timeout_s: float = 30.0
    """A downstream connection holding DATA for a peer whose flow-control windows stay shut,
    with no window opened for this long, is sent GOAWAY ENHANCE_YOUR_CALM and closed
    (``stall``); the mTLS (inbound) listener waits twice as long, so the sidecar in front of a
    client that stopped reading acts first and a shared mesh connection is never cut for one
    slow client behind it; 0 disables."""
    max_pending_calls: int = 1024
    """Calls of one listener waiting for an upstream connection or stream slot; further calls
    are answered RESOURCE_EXHAUSTED at once (``pending_calls``)."""
    stream_window_bytes: int = 1 * MiB
    """Receive window per stream: bytes buffered per stream are bounded by it."""
    connection_window_bytes: int = 4 * MiB
    """Receive window per connection."""
    replay_buffer_bytes: int = 64 * KiB
    """Request bytes kept per stream until the response starts, to resend a stream an
    upstream refused or never processed (GOAWAY). Larger requests are not resent."""
    write_high_water_bytes: int = 256 * KiB
    """Transport buffer above which a connection stops taking relayed data (backpressure)."""
    upstream_connections_per_endpoint: int = 4
    """Pooled connections to one endpoint (more open when all are at their stream limit)."""
    connect_timeout_s: float = 5.0
    keepalive_interval_s: float = 30.0
    """Idle time before we PING a peer; 0 disables keepalive."""
    keepalive_timeout_s: float = 10.0
    """A PING unanswered for this long closes the connection."""
    idle_timeout_s: float = 300.0
    """A connection with no streams for this long is closed with GOAWAY; 0 disables."""
    max_connection_age_s: float = 0.0
    """A downstream connection older than this is sent GOAWAY and drained; 0 disables."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int | float if f.name.endswith("_s") else int  # bytes and counts go on the wire
            if (isinstance(value, bool) or not isinstance(value, kind) or not value >= 0
                    or value == float("inf")):
                what = "finite number" if kind is not int else "integer"
                raise ValueError(f"limits.{f.name} must be a non-negative {what}, got {value!r}")
        for name in ("stream_window_bytes", "connection_window_bytes"):
            if not 65535 <= getattr(self, name) <= 2**31 - 1:
                raise ValueError(f"limits.{name}: flow-control windows must be 65535..2^31-1 bytes")
        if not 16384 <= self.max_frame_bytes <= (1 << 24) - 1:
            raise ValueError("limits.max_frame_bytes must be 16384..16777215")
        if self.max_concurrent_streams < 1:
            raise ValueError("limits.max_concurrent_streams must be at least 1")
        if self.max_header_list_bytes < 1024:
            raise ValueError("limits.max_header_list_bytes must be at least 1024")
        for name in ("max_connections", "max_connections_per_peer", "max_resets_per_s",
                     "max_control_frames_per_s", "max_empty_frames_per_s",
                     "max_continuation_frames", "max_pending_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be at least 1")
        if self.handshake_timeout_s <= 0:
            raise ValueError("limits.handshake_timeout_s must be positive")
        if self.max_message_bytes < 1:
            raise ValueError("limits.max_message_bytes must be positive")
