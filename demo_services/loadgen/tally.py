"""The load generator's counts, per request id (thread-safe; the clock is passed in).

An order's outcome is the last state an answer gave for its request id: ``confirmed``,
``cancelled`` and ``pending`` count request ids, never calls, so a re-send is not counted
twice. A re-send whose answer names another order, or a terminal order whose state changes,
is an idempotency ``mismatch``.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("CONFIRMED", "CANCELLED")
RATE_WINDOW_S = 5.0


def reason_kind(reason: str) -> str:
    """'out of stock: sku-9' -> 'out of stock' (the part before a colon)."""
    return reason.split(":", 1)[0].strip() or "unknown"


@dataclass
class _Outcome:
    order_id: str
    state: str


@dataclass
class Tally:
    started_at: float
    sent: int = 0                 # distinct request ids sent
    resent: int = 0               # sends of a request id sent before
    dropped: int = 0              # sends skipped: too many calls in flight (bounded open loop)
    in_flight: int = 0
    mismatches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cancel_reasons: Counter[str] = field(default_factory=Counter)
    _outcomes: dict[str, _Outcome] = field(default_factory=dict)
    _states: Counter[str] = field(default_factory=Counter)
    _send_times: deque[float] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_send(self, resend: bool, now: float) -> None:
        with self._lock:
            if resend:
                self.resent += 1
            else:
                self.sent += 1
            self.in_flight += 1
            self._send_times.append(now)
            self._trim(now)

    def on_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def on_answer(self, request_id: str, order_id: str, state: str, reason: str,
                  call_done: bool = True) -> None:
        """An answer for ``request_id`` (from CreateOrder, or from GetOrder when
        ``call_done`` is False: a poll of a pending order, no call in flight ended)."""
        with self._lock:
            if call_done:
                self.in_flight -= 1
            old = self._outcomes.get(request_id)
            if old is not None:
                if old.order_id != order_id or (old.state in TERMINAL and state != old.state):
                    self.mismatches += 1
                    return
                if old.state == state:
                    return
                self._states[old.state] -= 1
            self._outcomes[request_id] = _Outcome(order_id, state)
            self._states[state] += 1
            if state == "CANCELLED":
                self.cancel_reasons[reason_kind(reason)] += 1

    def on_error(self, code: str) -> None:
        with self._lock:
            self.in_flight -= 1
            self.errors[code] += 1

    def pending(self) -> dict[str, str]:
        """request id -> order id of the orders last seen PENDING."""
        with self._lock:
            return {rid: o.order_id for rid, o in self._outcomes.items() if o.state == "PENDING"}

    def _trim(self, now: float) -> None:
        while self._send_times and self._send_times[0] < now - RATE_WINDOW_S:
            self._send_times.popleft()

    def snapshot(self, now: float) -> dict[str, Any]:
        """The counts as a JSON-ready document (``rps``: sends per second, last 5 s)."""
        with self._lock:
            self._trim(now)
            window = min(RATE_WINDOW_S, max(now - self.started_at, 1e-9))
            return {
                "sent": self.sent, "resent": self.resent, "dropped": self.dropped,
                "confirmed": self._states["CONFIRMED"], "cancelled": self._states["CANCELLED"],
                "pending": self._states["PENDING"], "in_flight": self.in_flight,
                "errors": dict(self.errors), "cancel_reasons": dict(self.cancel_reasons),
                "mismatches": self.mismatches,
                "rps": round(len(self._send_times) / window, 2),
                "elapsed_s": round(now - self.started_at, 1),
            }


def one_line(doc: dict[str, Any]) -> str:
    """A snapshot as one human line."""
    errors = " ".join(f"{k}={v}" for k, v in sorted(doc["errors"].items())) or "0"
    return (f"{doc['elapsed_s']:>6.0f}s sent {doc['sent']} (+{doc['resent']} resent) "
            f"confirmed {doc['confirmed']} cancelled {doc['cancelled']} pending "
            f"{doc['pending']} in flight {doc['in_flight']} errors {errors} "
            f"dropped {doc['dropped']} {doc['rps']:.1f} req/s")
