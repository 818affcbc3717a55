"""Pooled upstream connections to one endpoint: which connection takes the next stream.

Pure bookkeeping: the relay asks ``acquire``; the I/O side is asked to connect through the
``connect`` callback and reports back through the relay. No sockets here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from .connection import H2Connection


class Pool:
    """Connections to one upstream endpoint, plus the calls waiting for a stream slot."""

    def __init__(self, key: str, label: str, max_connections: int,
                 connect: Callable[[Pool], None]) -> None:
        self.key = key
        """Identifies the endpoint (address and expected identity)."""
        self.label = label
        """How errors name the endpoint, e.g. ``127.0.0.1:15006 (payment)``."""
        self.max_connections = max(1, max_connections)
        self.conns: list[H2Connection] = []
        self.connecting = 0
        self.awaiting_settings: set[H2Connection] = set()
        """Connected, but the peer's SETTINGS (its stream limit) have not arrived yet."""
        self.waiting: deque[Any] = deque()
        """Calls waiting for a stream slot, oldest first. Only the relay adds and removes
        them (it counts them across its pools against ``limits.max_pending_calls``)."""
        self.closed = False
        self._connect = connect
        self.last_error = ""

    def pick(self) -> H2Connection | None:
        """The ready connection with the fewest streams that can open one, or None."""
        conns = self.conns
        if len(conns) == 1:
            conn = conns[0]
            return conn if conn.can_open_stream() else None
        best: H2Connection | None = None
        for conn in conns:
            if conn.can_open_stream() and (best is None or conn.active_streams < best.active_streams):
                best = conn
        return best

    def acquire(self) -> H2Connection | None:
        """``pick``, and when nothing can take a stream start a new connection if the pool
        has room (the caller queues the call)."""
        best = self.pick()
        if best is None:
            self._maybe_connect()
        return best

    def _maybe_connect(self) -> None:
        """Start one connection at a time: when it is up and still no connection can take
        the waiting calls (peer stream limits), the relay asks for the next."""
        if self.closed or self.connecting:
            return
        if len(self.conns) + self.connecting < self.max_connections:
            self.connecting += 1
            self._connect(self)

    def ensure_connecting(self) -> None:
        """Start a connection if none is ready or under way (a call is waiting)."""
        if not any(c.can_open_stream() for c in self.conns):
            self._maybe_connect()  # starts nothing while an attempt is under way

    def connected(self, conn: H2Connection) -> None:
        self.connecting = max(0, self.connecting - 1)
        conn.owner = self
        self.conns.append(conn)

    def connect_failed(self, reason: str) -> bool:
        """Record a failed attempt; True when waiting calls have nowhere left to go."""
        self.connecting = max(0, self.connecting - 1)
        self.last_error = reason
        return self.connecting == 0 and not any(c.can_open_stream() for c in self.conns)

    def remove(self, conn: H2Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

