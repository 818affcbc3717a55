"""A retry budget (Linkerd's model): over a window of ``window_s`` seconds, retries may be at
most ``percent`` % of the requests plus ``min_per_s`` × ``window_s``, so retries cannot
amplify an outage. Pure: no I/O, time comes from the clock it is given (or the caller).

The bound holds for *every* window of that length, whatever it starts, not only for windows
aligned to some grid: a retry at time t is granted only if, for each window of length
``window_s`` that contains t, the retries already granted in it plus this one fit the
allowance computed from the requests seen in it so far (later requests only raise an
allowance, later retries are checked when they come). Time is kept in ``buckets`` slots of
``window_s / buckets`` seconds; for a window starting inside a slot, that slot's retries
count and its requests do not, so the counts err on the side of fewer retries (at most one
slot's requests, 1/``buckets`` of a window, go uncounted).

Per request (the hot path): a clock read unless the time is passed in, two comparisons and
one increment (a division when a new bucket begins); nothing is allocated. The check runs only when a retry is asked for, over the
window's slots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RetryBudget:
    """Requests deposit, retries withdraw. ``withdraw`` is True, and the retry counted, when
    the budget allows one more retry now; False (and nothing counted) when it does not."""

    __slots__ = ("percent", "min_per_s", "window_s", "clock", "_width_s", "_slots", "_req",
                 "_ret", "_index", "_slot", "_lo_s", "_hi_s", "_reserve100", "granted",
                 "denied")

    def __init__(self, percent: float = 20.0, min_per_s: float = 10.0, window_s: float = 10.0,
                 *, buckets: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0 or buckets < 1 or percent < 0 or min_per_s < 0:
            raise ValueError("retry budget: window_s > 0, buckets >= 1, percent and "
                             "min_per_s >= 0")
        self.percent = float(percent)
        self.min_per_s = float(min_per_s)
        self.window_s = float(window_s)
        self.clock = clock
        self._width_s = self.window_s / buckets
        # Slots for the window's buckets plus the two it may start or end inside (rounding).
        self._slots = buckets + 2
        self._req = [0] * self._slots
        self._ret = [0] * self._slots
        self._index: int | None = None  # the bucket (floor(t / width)) of the newest event
        self._slot = 0  # its slot
        # The newest bucket's times, exactly: floor(t / width) == _index iff _lo_s <= t <
        # _hi_s, so ``deposit`` needs no division while the bucket lasts.
        self._lo_s = self._hi_s = 0.0
        self._reserve100 = 100.0 * self.min_per_s * self.window_s
        self.granted = 0
        """Retries granted since start."""
        self.denied = 0
        """Retries refused since start (the budget was exhausted)."""

    def same_terms(self, percent: float, min_per_s: float, window_s: float) -> bool:
        """True when this budget already runs on these terms (a new snapshot may keep it)."""
        return (self.percent, self.min_per_s, self.window_s) == (percent, min_per_s, window_s)

    def _bucket(self, now_s: float) -> int:
        """The slot for an event at ``now_s``, after forgetting buckets too old to matter.
        A clock that steps back counts into the newest bucket (never an older one)."""
        i = math.floor(now_s / self._width_s)
        cur = self._index
        if cur is None or i > cur:
            n = self._slots
            if cur is None or i - cur >= n:
                self._req[:] = [0] * n
                self._ret[:] = [0] * n
            else:
                for k in range(cur + 1, i + 1):
                    self._req[k % n] = 0
                    self._ret[k % n] = 0
            self._index = cur = i
            self._slot = cur % n
            self._lo_s = self._edge(cur)
            self._hi_s = self._edge(cur + 1)
        return self._slot

    def _edge(self, k: int) -> float:
        """The smallest float t with floor(t / width) >= k (floating-point division is
        monotonic, so the times of bucket k are exactly [_edge(k), _edge(k + 1)))."""
        w = self._width_s
        t = k * w
        while math.floor(t / w) >= k:
            t = math.nextafter(t, -math.inf)
        while math.floor(t / w) < k:
            t = math.nextafter(t, math.inf)
        return t

    def deposit(self, now_s: float | None = None) -> None:
        """Count a request (a call's first attempt) at ``now_s`` (default: the clock)."""
        if now_s is None:
            now_s = self.clock()
        if self._lo_s <= now_s < self._hi_s:
            self._req[self._slot] += 1
        else:
            self._req[self._bucket(now_s)] += 1

    def withdraw(self, now_s: float | None = None) -> bool:
        """Ask for one retry at ``now_s`` (default: the clock): True and counted when every
        window of ``window_s`` containing now still has room for it; False otherwise."""
        now = self.clock() if now_s is None else now_s
        slot = self._bucket(now)
        if self._room(now) >= 1.0:
            self._ret[slot] += 1
            self.granted += 1
            return True
        self.denied += 1
        return False

    def available(self, now_s: float | None = None) -> int:
        """Retries the budget would grant now, one after another (for ``/stats``)."""
        now = self.clock() if now_s is None else now_s
        self._bucket(now)
        return max(0, math.floor(self._room(now)))

    def _room(self, now: float) -> float:
        """Retries still allowed in the tightest window of ``window_s`` that contains now:
        min over window starts a in [now - window_s, now] of allowance - retries, where the
        bucket holding a gives its retries but not its requests."""
        cur = self._index
        assert cur is not None
        n = self._slots
        first = max(math.floor((now - self.window_s) / self._width_s), cur - n + 1)
        req_after = 0  # requests in the buckets after the one holding the window's start
        retries = 0
        room = math.inf
        pct = self.percent
        reserve100 = self._reserve100
        req, ret = self._req, self._ret
        for k in range(cur, first - 1, -1):
            s = k % n
            retries += ret[s]
            # ×100 keeps integer percents exact in floating point.
            room = min(room, (pct * req_after + reserve100) / 100.0 - retries)
            req_after += req[s]
        return room
