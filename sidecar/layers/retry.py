"""Retry: gRPC retries done by the mesh (gRFC A6), within a budget per upstream service
(Linkerd's), so a failed attempt is tried again, preferably on another endpoint, before the
caller sees it.

How it meets the relay: ``on_request`` puts the service's retry plan on the call
(``call.retry``, shared by every call of that service under one snapshot: nothing is
allocated for a call that is never retried) and deposits the request in the budget. The
relay keeps the request's bytes until the response commits (first response headers that are
not trailers-only), up to ``call.retry.max_request_bytes``, and arms a per-try timer when
``call.retry.per_try_timeout_s`` is set. When an attempt fails before commit it asks
``call.retry.again(call, reason, status, answer)``; the answer is None (the caller gets
this attempt's answer) or the decision for the next attempt: the layers below this one run
again (timeout, balance), usually behind a ``Delayed`` backoff. From its first retry the call
has its own ``RetryState`` in ``call.retry``.

Reasons an attempt fails (``reason``, what the relay passes):

* ``status``: a trailers-only answer whose grpc-status is in ``retry_on`` (the counters use
  the status name, e.g. ``UNAVAILABLE``); ``grpc-retry-pushback-ms`` from the server sets
  the wait (a negative or malformed value: no retry);
* ``refused_stream``, ``goaway``: the endpoint did not process the stream; sent again at
  once, without backoff;
* ``connect_failure``: no connection to the endpoint, nothing was sent;
* ``connection_lost``: the connection went away before any response (UNAVAILABLE; only when
  UNAVAILABLE is in ``retry_on``);
* ``per_try_timeout``: the attempt ran past ``per_try_timeout_ms`` (its stream is reset).

Never retried: a committed call (counted when it ends with a status in ``retry_on``); a
method in ``non_idempotent`` (unless the endpoint provably did not process it: refused
stream, GOAWAY, connect failure, which gRFC A6 retries transparently); a local fast-fail or
an injected abort (answered above this layer, never reaching it); past ``max_attempts``;
a request that outgrew ``max_request_bytes`` after bytes of it were sent; when the wait would
end past the call's deadline; when the upstream's concurrent retries are at
``CircuitLimits.max_retries`` (``call.upstream``, from the limits layer: a call holds one
retry slot there from its first retry until it ends); when the budget is exhausted; when the
layers below answer locally (no endpoint).

Every attempt is recorded on the call: ``call.retry.attempts`` lists ``(endpoint address,
reason, grpc status)`` per attempt (the last one's reason is ``final``), ``call.tried`` the
endpoints of the failed ones (the balancers prefer others), and ``call.notes`` says why each
retry happened or did not. When the layers below run again for a retry, ``call.endpoint`` is
still the failed attempt's endpoint, ``call.grpc_status`` its status and ``call.tried[-1]``
that endpoint: a balancer or outlier detector may take that as the outcome of its previous
pick.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

from mesh_common.snapshot import RetryPolicy, Snapshot, StringMatch
from sidecar.http2 import grpc as G
from sidecar.http2.headers import HeaderBlock
from sidecar.http2.relay import Call, Delayed, LocalReply
from sidecar.retry_budget import RetryBudget

from .base import NOT_RETRIED as NOT_RETRIED_EVENT
from .base import RETRY, Decision, Layer, Next, note

STATUS = "status"
REFUSED_STREAM = "refused_stream"
GOAWAY = "goaway"
CONNECT_FAILURE = "connect_failure"
CONNECTION_LOST = "connection_lost"
PER_TRY_TIMEOUT = "per_try_timeout"
FINAL = "final"

_UNPROCESSED = frozenset({REFUSED_STREAM, GOAWAY, CONNECT_FAILURE})
"""The endpoint never processed the request: safe to send again for any method."""
_IMMEDIATE = frozenset({REFUSED_STREAM, GOAWAY})
"""Sent again at once: the protocol told us to go elsewhere (gRFC A6 transparent retry)."""

NOT_RETRIED = ("committed", "non_idempotent", "too_large", "max_attempts", "deadline",
               "pushback", "limit", "no_endpoint")
"""Why a retryable failure was not retried (``/stats``); an exhausted budget is counted on
its own as ``budget_exhausted``."""


class _Counts:
    """Per upstream service, since start."""

    __slots__ = ("retried", "not_retried", "budget_exhausted", "succeeded")

    def __init__(self) -> None:
        self.retried: dict[str, int] = {}
        self.not_retried: dict[str, int] = dict.fromkeys(NOT_RETRIED, 0)
        self.budget_exhausted = 0
        self.succeeded = 0
        """Calls that ended OK after at least one retry."""


class _Method:
    """One ``non_idempotent`` entry, compiled once per snapshot."""

    __slots__ = ("kind", "value", "regex")

    def __init__(self, m: StringMatch) -> None:
        self.kind = m.kind
        self.value = m.value
        self.regex = re.compile(m.value) if m.kind == "regex" else None

    def test(self, path: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return path == self.value if self.kind == "exact" else path.startswith(self.value)


class _View:
    """What the relay reads from ``call.retry`` (a plan shared by the calls that never
    retried, or the call's own ``RetryState``)."""

    __slots__ = ()
    plan: RetryPlan
    attempts: Any
    max_request_bytes: int
    per_try_timeout_s: float | None

    def again(self, call: Call, reason: str, status: int | None,
              answer: HeaderBlock | None = None) -> Decision | None:
        """After an attempt failed for ``reason`` (with grpc ``status``; ``answer``: the
        trailers-only response, read for ``grpc-retry-pushback-ms``) before commit: the
        decision for the next attempt, or None when the caller is to get this attempt's
        answer."""
        return self.plan.layer.again(call, reason, status, answer)


class RetryPlan(_View):
    """A service's retry policy under one snapshot; ``call.retry`` of its calls until they
    retry. ``attempts`` is empty: such a call made one attempt, told by the call itself."""

    __slots__ = ("layer", "service", "policy", "retry_on", "non_idempotent", "budget",
                 "counts", "next", "plan", "attempts", "max_request_bytes",
                 "per_try_timeout_s", "base_s", "cap_s")

    def __init__(self, layer: Retry, service: str, policy: RetryPolicy, budget: RetryBudget,
                 counts: _Counts, next: Next) -> None:
        self.layer = layer
        self.service = service
        self.policy = policy
        self.retry_on = frozenset(policy.retry_on)
        self.non_idempotent = tuple(_Method(m) for m in policy.non_idempotent)
        self.budget = budget
        self.counts = counts
        self.next = next
        """The layers below the retry layer: run again for each attempt."""
        self.plan = self
        self.attempts: tuple[()] = ()
        # Nothing to replay for a policy that never retries: no bytes are kept.
        self.max_request_bytes = policy.max_request_bytes if policy.max_attempts > 1 else 0
        self.per_try_timeout_s = (None if policy.per_try_timeout_ms is None
                                  else policy.per_try_timeout_ms / 1000)
        self.base_s = policy.backoff_base_ms / 1000
        self.cap_s = policy.backoff_max_ms / 1000

    def idempotent(self, path: str) -> bool:
        return not any(m.test(path) for m in self.non_idempotent)


class RetryState(_View):
    """``call.retry`` from a call's first retryable failure on: its attempts so far
    (``(address, reason, status)`` each), retries granted and the backoff's progress."""

    __slots__ = ("plan", "attempts", "retries", "backoff_n", "in_flight", "open",
                 "max_request_bytes", "per_try_timeout_s")

    def __init__(self, plan: RetryPlan) -> None:
        self.plan = plan
        self.attempts: list[tuple[str, str, int | None]] = []
        self.retries = 0
        self.backoff_n = 0
        self.in_flight: Any = None
        """The upstream (``call.upstream``) whose retry slot this call holds, from its first
        retry until it ends."""
        self.open = True
        """The current attempt is not recorded yet."""
        self.max_request_bytes = plan.max_request_bytes
        self.per_try_timeout_s = plan.per_try_timeout_s


def parse_pushback(value: str) -> float | None:
    """``grpc-retry-pushback-ms`` → seconds to wait; None when negative or malformed (gRFC
    A6: the server asks not to retry)."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    return int(text) / 1000


def _address(call: Call) -> str:
    ep = call.endpoint
    return ep.address if ep is not None else call.upstream_label


class Retry(Layer):
    """Sets ``call.retry`` for every routed call (``call.route``) from the service's
    ``RouteRule.retries`` (a service without a route uses ``RetryPolicy()``), deposits the
    request in the service's budget and passes the call on; decides retries when the relay
    asks (``again``). ``rng`` draws the backoff jitter, ``clock`` is the relay's clock
    (seconds). Never raises for any call or snapshot."""

    def __init__(self, snapshot: Callable[[], Snapshot], rng: random.Random | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.snapshot = snapshot
        self._random = (rng or random.Random()).random
        self.clock = clock or time.monotonic
        self._snap: Snapshot | None = None
        self._next: Next | None = None
        self._plans: dict[str, RetryPlan] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._counts: dict[str, _Counts] = {}

    # ------------------------------------------------------------ per snapshot
    def _build(self, snap: Snapshot, next: Next) -> None:
        self._plans = {}
        self._snap = snap
        self._next = next

    def _plan(self, service: str) -> RetryPlan:
        """The plan of ``service`` under the snapshot in force (made on its first call)."""
        snap = self._snap
        assert snap is not None and self._next is not None
        route = snap.route(service)
        policy = route.retries if route is not None else RetryPolicy()
        budget = self._budgets.get(service)
        terms = (policy.budget_percent, policy.budget_min_per_s, policy.budget_window_s)
        if budget is None or not budget.same_terms(*terms):
            budget = self._budgets[service] = RetryBudget(*terms, clock=self.clock)
        counts = self._counts.get(service)
        if counts is None:
            counts = self._counts[service] = _Counts()
        plan = self._plans[service] = RetryPlan(self, service, policy, budget, counts, self._next)
        return plan

    # ------------------------------------------------------------ per call
    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        if snap is not self._snap or next is not self._next:
            self._build(snap, next)
        service = call.route
        if service:
            plan = self._plans.get(service)
            if plan is None:
                plan = self._plan(service)
            plan.budget.deposit(call.started_s)
            call.retry = plan
        return next(call)

    def on_end(self, call: Call) -> None:
        state = call.retry
        if state is None:
            return
        plan = state.plan
        status = call.grpc_status
        if call.committed and status and status in plan.retry_on:
            plan.counts.not_retried["committed"] += 1
        if state is plan:
            return
        assert isinstance(state, RetryState)
        if state.open:
            state.open = False
            state.attempts.append((_address(call), FINAL, status))
        if state.in_flight is not None:
            _release(state)
        if status == G.OK and state.retries:
            plan.counts.succeeded += 1

    def again(self, call: Call, reason: str, status: int | None,
              answer: HeaderBlock | None = None) -> Decision | None:
        """See ``_View.again``: decides, counts and notes whether the failed attempt is
        tried again, and if so runs the layers below for the next attempt."""
        state = call.retry
        if state is None:
            return None
        plan: RetryPlan = state.plan
        if reason == STATUS:
            if status not in plan.retry_on:
                return None  # an answer, not a retryable failure
            key = G.STATUS_NAMES.get(status, str(status))
        elif reason == CONNECTION_LOST:
            if G.UNAVAILABLE not in plan.retry_on:
                return None
            key = reason
        else:
            key = reason
        if call.fast_fail or call.committed or call.local_reply is not None:
            return None  # the relay never asks for these: safe either way
        if state is plan:
            state = call.retry = RetryState(plan)
        assert isinstance(state, RetryState)
        address = _address(call)
        state.attempts.append((address, key, status))
        state.open = False
        policy = plan.policy
        counts = plan.counts
        now = self.clock()

        def refuse(why: str, text: str) -> None:
            if why == "budget":
                counts.budget_exhausted += 1
            else:
                counts.not_retried[why] += 1
            note(call, f"not retried after {key} from {address}: {text}", NOT_RETRIED_EVENT,
                 {"mesh.retry.reason": key, "mesh.retry.from": address,
                  "mesh.retry.refused": why} if call.span is not None else None)

        if reason not in _UNPROCESSED and not plan.idempotent(call.path):
            refuse("non_idempotent", f"{call.path} is marked non-idempotent")
            return None
        if state.retries + 1 >= policy.max_attempts:
            refuse("max_attempts", f"{policy.max_attempts} attempts made")
            return None
        if call.replay is None and call.attempts:  # bytes were sent and are gone
            refuse("too_large", f"the request outgrew the retry buffer of "
                   f"{plan.max_request_bytes} bytes")
            return None
        pushback = answer.lookup("grpc-retry-pushback-ms") if answer is not None else None
        if reason in _IMMEDIATE:
            delay_s = 0.0
        elif pushback is not None:
            delay = parse_pushback(pushback)
            if delay is None:
                refuse("pushback", f"the server asked not to retry (grpc-retry-pushback-ms "
                       f"{pushback!r})")
                return None
            delay_s = delay
            state.backoff_n = 0  # gRFC A6: after a pushback the backoff starts over
        else:
            delay_s = self._random() * min(plan.cap_s, plan.base_s * (2 ** state.backoff_n))
            state.backoff_n = min(state.backoff_n + 1, 32)
        if call.deadline_s is not None and now + delay_s >= call.deadline_s:
            refuse("deadline", f"the call's deadline comes before the next attempt could "
                   f"(wait {delay_s * 1e3:.0f} ms)")
            return None
        upstream = call.upstream
        slot = state.in_flight is None and upstream is not None
        if slot and not upstream.take_retry():
            refuse("limit", f"concurrent retries of {plan.service} are at max_retries "
                   f"({upstream.max_retries})")
            return None
        if not plan.budget.withdraw(now):
            if slot:
                upstream.release_retry()
            refuse("budget", f"the retry budget of {plan.service} is exhausted "
                   f"({policy.budget_percent:g}% of requests + {policy.budget_min_per_s:g}/s)")
            return None
        # Another attempt: the layers below run again, preferring an endpoint not tried yet.
        failed = call.endpoint
        if failed is not None and failed not in call.tried:
            call.tried = (*call.tried, failed)
        decision = plan.next(call)
        then = decision.then if isinstance(decision, Delayed) else decision
        if isinstance(then, LocalReply):
            if slot:
                upstream.release_retry()
            call.endpoint = failed  # the failed attempt's answer is the caller's
            refuse("no_endpoint", then.message)
            return None
        if slot:
            state.in_flight = upstream  # held until the call ends
        state.retries += 1
        state.open = True
        counts.retried[key] = counts.retried.get(key, 0) + 1
        to = _address(call)
        note(call, f"retry {state.retries} of {policy.max_attempts - 1} after {key} from "
             f"{address}: to {to}" + (f" in {delay_s * 1e3:.0f} ms" if delay_s > 0 else ""),
             RETRY, {"mesh.retry": state.retries, "mesh.attempt": state.retries + 1,
                     "mesh.retry.reason": key, "mesh.retry.from": address,
                     "mesh.endpoint": to, "mesh.retry.backoff_ms": round(delay_s * 1e3, 3)}
             if call.span is not None else None)
        if isinstance(decision, Delayed):
            return Delayed(decision.seconds + delay_s, decision.then)
        return Delayed(delay_s, decision) if delay_s > 0 else decision

    # ------------------------------------------------------------ reporting
    def counters(self) -> dict[str, Any]:
        """``{"retries": {service: {"retried": {reason: n}, "budget_exhausted": n,
        "not_retried": {why: n}, "succeeded_after_retry": n, "budget_available": n}}}``
        since start; ``reason`` is a status name (UNAVAILABLE, ...) or refused_stream,
        goaway, connect_failure, connection_lost, per_try_timeout; ``why`` one of
        ``NOT_RETRIED``; ``budget_available`` is how many retries the budget would grant
        now."""
        out: dict[str, Any] = {}
        for service, c in self._counts.items():
            budget = self._budgets.get(service)
            out[service] = {"retried": dict(c.retried), "budget_exhausted": c.budget_exhausted,
                            "not_retried": dict(c.not_retried),
                            "succeeded_after_retry": c.succeeded,
                            "budget_available": budget.available() if budget else 0}
        return {"retries": out}


# ---------------------------------------------------------------- concurrent retries
def _release(state: RetryState) -> None:
    """Give back the upstream's retry slot the call held (``call.upstream``, the limits
    layer's ``sidecar.upstream.Upstream``: ``take_retry``/``release_retry``)."""
    upstream = state.in_flight
    state.in_flight = None
    upstream.release_retry()
