"""Authorize: the inbound side's check of who may call what, at request headers.

The caller is ``call.peer_id`` (the SPIFFE ID of its mTLS certificate; None on a plaintext
listener, decided as "" = unauthenticated), the destination this sidecar's service, the
method ``call.path``. The verdict is ``mesh_common.authz.decide`` on the snapshot's
``authz``, the same function ``meshctl authz check`` asks the control plane to run:

* allowed: the call goes on to the local app;
* denied: answered here with PERMISSION_DENIED and the decision's reason (it names the
  caller and the policy, or the default, that decided), noted on the call (span event
  ``denied`` on a traced call) and logged (rate-limited); the app never sees it.

Policies in dry-run mode never change a verdict: ``decide_dry_run`` is counted beside it and,
when it differs from the enforced verdict, logged (rate-limited).

Decisions are counted by ``(decision, policy, mode)`` (``allow``/``deny``; the policy's name,
``(default)`` for the mesh default, ``(no rule)`` when the service has ALLOW rules and none
matched; ``enforce``/``dry_run``) and read at scrape time (``counts``).

Per call: the verdict of ``(peer, method)`` is cached for as long as the snapshot's ``authz``
stays the same (two dict lookups, nothing allocated); the cache holds at most
``MAX_CACHED`` verdicts and starts over when full. A service no policy names, under the
default ``allow``, costs one attribute check and one increment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mesh_common.authz import ALLOW, AuthzConfig, decide, decide_dry_run
from mesh_common.snapshot import Snapshot
from sidecar.http2.relay import Call, LocalReply

from .base import DENIED, Decision, Layer, Next, note

log = logging.getLogger("mesh.sidecar.authz")

PERMISSION_DENIED = 7
MAX_CACHED = 4096
"""Verdicts cached per snapshot ``authz`` (peers x methods); the cache starts over when full."""
LOG_WINDOW_S = 10.0
LOG_PER_WINDOW = 20
"""At most this many deny and dry-run lines per ``LOG_WINDOW_S``; the rest are counted and
summed up in one line when the next window opens."""
DEFAULT_POLICY = "(default)"
"""The ``policy`` label of a verdict the mesh default gave (no policy of the service allows)."""
NO_RULE = "(no rule)"
"""The ``policy`` label of a denial because the service has ALLOW rules and none matched."""
ENFORCE, DRY_RUN = "enforce", "dry_run"


class _Count:
    """One counter cell (a verdict holds its own, so counting is one increment)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _DryRun:
    """What the dry-run policies decide for one (peer, method), prepared once."""

    __slots__ = ("count", "differs", "line")

    def __init__(self, count: _Count, differs: bool, line: str) -> None:
        self.count = count
        self.differs = differs
        self.line = line


class _Verdict:
    """The enforced decision for one (peer, method), prepared once: the reply when denied,
    the counter, the span event's attributes, and the dry-run verdict (None without dry-run
    policies)."""

    __slots__ = ("allowed", "reply", "reason", "count", "attrs", "dry")

    def __init__(self, allowed: bool, reason: str, count: _Count, attrs: dict[str, Any],
                 dry: _DryRun | None) -> None:
        self.allowed = allowed
        self.reason = reason
        self.reply = None if allowed else LocalReply(PERMISSION_DENIED, reason)
        self.count = count
        self.attrs = attrs
        self.dry = dry


class RateLimitedLog:
    """At most ``per_window`` lines per ``window_s`` seconds (by ``clock``); the excess is
    counted and reported in one line when the next window opens."""

    def __init__(self, logger: logging.Logger, window_s: float = LOG_WINDOW_S,
                 per_window: int = LOG_PER_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.window_s = window_s
        self.per_window = per_window
        self.clock = clock
        self._start = float("-inf")
        self._n = 0
        self.suppressed = 0
        """Lines left out in the current window."""

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._start >= self.window_s:
            if self.suppressed:
                self.logger.warning("%d more authorization line(s) left out in %gs",
                                    self.suppressed, self.window_s)
            self._start, self._n, self.suppressed = now, 0, 0
        if self._n < self.per_window:
            self._n += 1
            self.logger.log(level, msg, *args)
        else:
            self.suppressed += 1


def _has_allow(authz: AuthzConfig, service: str, dry_run_too: bool) -> bool:
    return any(r.action == ALLOW for p in authz.for_service(service)
               if dry_run_too or not p.dry_run for r in p.rules)


class Authorize(Layer):
    """The inbound authorization of ``service``'s calls (see the module doc). ``snapshot``
    returns the snapshot in force (read once per call); ``clock`` (seconds) paces the log.
    Never raises on the data path."""

    def __init__(self, snapshot: Callable[[], Snapshot], service: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.snapshot = snapshot
        self.service = service
        self.log = RateLimitedLog(logger, clock=clock)
        self._snap: Snapshot | None = None
        self._authz: AuthzConfig | None = None
        self._open = True
        self._open_count = _Count()
        self._cache: dict[str | None, dict[str, _Verdict]] = {}
        self._cached = 0
        self._has_allow = False
        self._has_allow_dry = False
        self._counts: dict[tuple[str, str, str], _Count] = {
            ("allow", DEFAULT_POLICY, ENFORCE): self._open_count}

    # ------------------------------------------------------------------ per snapshot
    def _take(self, snap: Snapshot) -> None:
        authz = snap.authz
        if authz is not self._authz and authz != self._authz:
            self._authz = authz
            self._cache, self._cached = {}, 0
            self._open = authz.default == "allow" and not authz.for_service(self.service)
            self._has_allow = _has_allow(authz, self.service, False)
            self._has_allow_dry = _has_allow(authz, self.service, True)
        self._snap = snap

    def _count(self, allowed: bool, policy: str, mode: str) -> _Count:
        key = ("allow" if allowed else "deny", policy, mode)
        cell = self._counts.get(key)
        if cell is None:
            cell = self._counts[key] = _Count()
        return cell

    def _verdict(self, peer: str | None, path: str) -> _Verdict:
        """Decide (peer, path) on the current ``authz`` and cache the prepared verdict."""
        authz = self._authz
        assert authz is not None
        source = peer or ""
        d = decide(authz, self.service, source, path)
        policy = d.policy or (NO_RULE if self._has_allow and not d.allowed else DEFAULT_POLICY)
        dry: _DryRun | None = None
        dd = decide_dry_run(authz, self.service, source, path)
        if dd is not None:
            dry_policy = dd.policy or (NO_RULE if self._has_allow_dry and not dd.allowed
                                       else DEFAULT_POLICY)
            line = (f"dry run of {self.service}'s policies: "
                    f"{'allow' if dd.allowed else 'deny'} ({dd.reason}); enforced: "
                    f"{'allow' if d.allowed else 'deny'}")
            dry = _DryRun(self._count(dd.allowed, dry_policy, DRY_RUN),
                          dd.allowed != d.allowed, line)
        attrs: dict[str, Any] = {"mesh.authz.policy": policy, "mesh.authz.rule": d.rule,
                                 "mesh.peer": source}
        v = _Verdict(d.allowed, d.reason, self._count(d.allowed, policy, ENFORCE), attrs, dry)
        if self._cached >= MAX_CACHED:
            self._cache, self._cached = {}, 0
        by_peer = self._cache.get(peer)
        if by_peer is None:
            by_peer = self._cache[peer] = {}
        by_peer[path] = v
        self._cached += 1
        return v

    # ------------------------------------------------------------------ per call
    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        if snap is not self._snap:
            self._take(snap)
        if self._open:
            self._open_count.n += 1
            return next(call)
        by_peer = self._cache.get(call.peer_id)
        v = by_peer.get(call.path) if by_peer is not None else None
        if v is None:
            v = self._verdict(call.peer_id, call.path)
        v.count.n += 1
        dry = v.dry
        if dry is not None:
            dry.count.n += 1
            if dry.differs:
                self.log(logging.INFO, "%s", dry.line)
        if v.allowed:
            return next(call)
        note(call, v.reason, DENIED, v.attrs)
        self.log(logging.WARNING, "denied: %s", v.reason)
        return v.reply  # type: ignore[return-value]

    # ------------------------------------------------------------------ reading
    def counts(self) -> list[tuple[str, str, str, int]]:
        """``(decision, policy, mode, count)`` for every counter that counted, sorted: what
        ``mesh_authz_decisions_total`` shows. Not per call."""
        return sorted((*k, c.n) for k, c in list(self._counts.items()) if c.n)

    def counters(self) -> dict[str, Any]:
        """``{"authz": {default, policies (this service's, with their mode), decisions
        [{decision, policy, mode, count}]}}`` for ``/stats``."""
        authz = self.snapshot().authz
        return {"authz": {
            "default": authz.default,
            "policies": {p.name: DRY_RUN if p.dry_run else ENFORCE
                         for p in authz.for_service(self.service)},
            "decisions": [{"decision": d, "policy": p, "mode": m, "count": n}
                          for d, p, m, n in self.counts()]}}
