"""Token buckets per subject and per route, pure (the clock is passed in).

A bucket holds at most ``burst`` tokens and gains ``rps`` per second; a request takes one. A
request passes only if every bucket it is counted against (its route's, its subject's) has a
token; otherwise none is taken and the answer is 429 with ``Retry-After`` (whole seconds,
rounded up) from the bucket that is furthest from a token.

The buckets live in this process: with N gateway replicas a client gets up to N times the
limit. A shared limit needs a shared store (e.g. Redis with an atomic script per take, or a
rate-limit service as Envoy's), at the cost of a network round trip per request.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from .routes import RateLimit

DEFAULT_MAX_SUBJECTS = 10_000
"""Subject buckets kept at most (the least recently used goes first: a full bucket again)."""


@dataclass
class TokenBucket:
    """``tokens`` (float) as of ``updated`` (seconds, any monotonic clock)."""

    limit: RateLimit
    tokens: float
    updated: float

    @classmethod
    def full(cls, limit: RateLimit, now: float) -> TokenBucket:
        return cls(limit, float(limit.burst), now)

    def refill(self, now: float) -> None:
        """Add the tokens earned since ``updated`` (never above burst; a clock that went
        back earns nothing)."""
        if now > self.updated:
            self.tokens = min(float(self.limit.burst),
                              self.tokens + (now - self.updated) * self.limit.rps)
            self.updated = now

    def wait_s(self, now: float) -> float:
        """Seconds until one token is there (0.0: there is one now)."""
        self.refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.limit.rps

    def take(self, now: float) -> None:
        self.refill(now)
        self.tokens -= 1.0


@dataclass(frozen=True)
class Decision:
    """``allowed``, else ``scope`` ("route" or "subject") and ``retry_after_s`` (whole
    seconds, >= 1)."""

    allowed: bool
    scope: str = ""
    retry_after_s: int = 0


ALLOW = Decision(True)


class RateLimiter:
    """Per-subject buckets (one limit for every subject) and per-route buckets (each route's
    own limit). Not thread-safe: the gateway calls it from its event loop."""

    def __init__(self, per_subject: RateLimit | None,
                 max_subjects: int = DEFAULT_MAX_SUBJECTS) -> None:
        self.per_subject = per_subject
        self.max_subjects = max_subjects
        self._subjects: OrderedDict[str, TokenBucket] = OrderedDict()
        self._routes: dict[tuple[str, RateLimit], TokenBucket] = {}

    def check(self, subject: str, route: str, route_limit: RateLimit | None,
              now: float) -> Decision:
        """Take one token from the route's and the subject's bucket, or none if either is
        empty (then the Decision says which and how long to wait)."""
        buckets: list[tuple[str, TokenBucket]] = []
        if route_limit is not None:
            key = (route, route_limit)
            bucket = self._routes.get(key)
            if bucket is None:
                bucket = self._routes[key] = TokenBucket.full(route_limit, now)
            buckets.append(("route", bucket))
        if self.per_subject is not None:
            bucket = self._subjects.get(subject)
            if bucket is None:
                bucket = TokenBucket.full(self.per_subject, now)
                self._subjects[subject] = bucket
                while len(self._subjects) > self.max_subjects:
                    self._subjects.popitem(last=False)
            self._subjects.move_to_end(subject)
            buckets.append(("subject", bucket))
        worst = max(((b.wait_s(now), scope) for scope, b in buckets), default=(0.0, ""))
        if worst[0] > 0:
            return Decision(False, worst[1], max(1, math.ceil(worst[0])))
        for _, b in buckets:
            b.take(now)
        return ALLOW

    @property
    def subjects(self) -> int:
        """How many subject buckets are kept."""
        return len(self._subjects)
