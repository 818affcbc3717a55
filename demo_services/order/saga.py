"""The order saga as a pure state machine: durable state + the outcome of the last step ->
the next durable state, the event that records the outcome, and how long to wait.

No I/O, no clock: the caller passes ``now_unix``. The runner (``runner.py``) executes the
step a state names, classifies what happened (``StepResult``), calls ``advance`` and stores
the decision (event + state, one transaction) before it runs the next step.

The plan::

    RESERVE -> CHARGE (the pivot) -> CONFIRM -> CONFIRMED
       |          |
       |          +-- failed --> [REFUND if the charge may have applied] -> [RELEASE] -> CANCEL
       +-- failed --> [RELEASE if the reservation may have applied] -> CANCEL -> CANCELLED

- OK: the step is done; go on.
- BUSINESS (FAILED_PRECONDITION, ABORTED): the participant answered that it did not apply the
  step (not enough stock, insufficient funds, refused after a compensation). No retry: the
  steps before it are compensated, in reverse.
- TRANSIENT (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED, UNKNOWN, INTERNAL,
  and any status not named here): the step may or may not have applied. It is retried (the
  participants are idempotent by (order id, step)) with capped exponential backoff. A forward
  step still failing after ``step_budget_s`` is given up: it counts as possibly applied and is
  compensated too, which is safe because a Release/Refund that arrives before its Reserve/Charge
  is recorded and the late original refused. Compensations are retried until they succeed.
- Once the charge is known to have applied, the saga only goes forward, to CONFIRMED.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import grpc

from .events import EventType


class Step(StrEnum):
    """What the saga does next (the durable ``step``), or where it ended (terminal)."""

    RESERVE = "RESERVE"
    CHARGE = "CHARGE"
    CONFIRM = "CONFIRM"          # local: append OrderConfirmed
    REFUND = "REFUND"
    RELEASE = "RELEASE"
    CANCEL = "CANCEL"            # local: append OrderCancelled
    CONFIRMED = "CONFIRMED"      # terminal
    CANCELLED = "CANCELLED"      # terminal

    @property
    def terminal(self) -> bool:
        return self in (Step.CONFIRMED, Step.CANCELLED)

    @property
    def local(self) -> bool:
        """A step the orchestrator does itself (no participant call; it cannot fail)."""
        return self in (Step.CONFIRM, Step.CANCEL)

    @property
    def forward(self) -> bool:
        """A participant step on the way to CONFIRMED (bounded by the step budget)."""
        return self in (Step.RESERVE, Step.CHARGE)

    @property
    def compensation(self) -> bool:
        """A participant step undoing a forward step (retried until it succeeds)."""
        return self in (Step.REFUND, Step.RELEASE)


TERMINAL_STEPS = frozenset({Step.CONFIRMED, Step.CANCELLED})


class Outcome(StrEnum):
    OK = "OK"
    BUSINESS = "BUSINESS"
    TRANSIENT = "TRANSIENT"


BUSINESS_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED})
TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
})


def classify(code: grpc.StatusCode) -> Outcome:
    """OK -> OK; FAILED_PRECONDITION/ABORTED -> BUSINESS; anything else -> TRANSIENT.

    A status outside both lists (PERMISSION_DENIED from a mesh policy, UNIMPLEMENTED, ...) does
    not say whether the step applied, so it is treated like a transient one: retried within
    the step budget, then compensated as possibly applied. That is never unsafe."""
    if code == grpc.StatusCode.OK:
        return Outcome.OK
    if code in BUSINESS_CODES:
        return Outcome.BUSINESS
    return Outcome.TRANSIENT


@dataclass(frozen=True)
class StepResult:
    """What happened to one attempt of a step. ``code`` is a gRPC status name, ``message`` the
    participant's (for BUSINESS, the reason the order is cancelled with), ``data`` what a
    successful step answered (``amount_cents``, ``refunded``, ``released``)."""

    outcome: Outcome
    code: str = "OK"
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, **data: Any) -> StepResult:
        return cls(Outcome.OK, "OK", "", data)

    @classmethod
    def failed(cls, code: grpc.StatusCode, message: str) -> StepResult:
        return cls(classify(code), code.name, message)


@dataclass(frozen=True)
class SagaPolicy:
    """Timing of retries, in seconds: a forward step is given up after ``step_budget_s`` of
    transient failures; retry ``n`` (0-based) waits
    ``min(backoff_cap_s, backoff_base_s * 2**n)``."""

    step_budget_s: float = 10.0
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0

    def backoff_s(self, failures: int) -> float:
        """Wait before the next attempt after ``failures`` (>= 1) failed attempts."""
        return min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(max(failures - 1, 0), 30))


@dataclass(frozen=True)
class SagaState:
    """The saga's durable state.

    ``step`` is what runs next (or the terminal state); ``attempts`` how many attempts of it
    failed transiently; ``step_since_unix`` when it became the current step (the budget counts
    from there); ``reason`` why the saga compensates ("" on the forward path);
    ``reserve_open``/``charge_open``: a Reserve/Charge that did or may have applied and is not
    compensated yet."""

    order_id: str
    step: Step = Step.RESERVE
    attempts: int = 0
    step_since_unix: float = 0.0
    reason: str = ""
    reserve_open: bool = False
    charge_open: bool = False

    @property
    def terminal(self) -> bool:
        return self.step.terminal


def start(order_id: str, now_unix: float) -> SagaState:
    """A new saga: its first step is RESERVE."""
    return SagaState(order_id=order_id, step=Step.RESERVE, step_since_unix=now_unix)


@dataclass(frozen=True)
class Decision:
    """What ``advance`` decided: the next durable ``state``; the ``event`` (type, data) that
    records the finished step, or None while a step is being retried; ``delay_s`` to wait
    before running ``state.step`` (0 for a new step)."""

    state: SagaState
    event: tuple[EventType, dict[str, Any]] | None
    delay_s: float = 0.0




def _next_compensation(state: SagaState) -> Step:
    """Compensations in reverse order of the forward steps, then CANCEL."""
    if state.charge_open:
        return Step.REFUND
    if state.reserve_open:
        return Step.RELEASE
    return Step.CANCEL


def _enter(state: SagaState, step: Step, now_unix: float, **changes: Any) -> SagaState:
    return replace(state, step=step, attempts=0, step_since_unix=now_unix, **changes)


def _failure_reason(step: Step, result: StepResult, gave_up_s: float | None) -> str:
    if gave_up_s is not None:
        detail = f"{result.code}: {result.message}" if result.message else result.code
        return f"{step.value.lower()} did not complete within {gave_up_s:g} s ({detail})"
    return result.message or f"{step.value.lower()} refused ({result.code})"


def advance(state: SagaState, result: StepResult, now_unix: float,
            policy: SagaPolicy = SagaPolicy()) -> Decision:
    """The decision after one attempt of ``state.step`` ended with ``result`` at ``now_unix``.

    Raises ValueError for a terminal state or a local step (CONFIRM, CANCEL) that did not
    end OK (those cannot fail). Never performs I/O."""
    step = state.step
    if step.terminal:
        raise ValueError(f"saga {state.order_id} is already {step.value}")
    if step.local and result.outcome is not Outcome.OK:
        raise ValueError(f"local step {step.value} cannot fail")

    if step is Step.CONFIRM:
        return Decision(_enter(state, Step.CONFIRMED, now_unix),
                        (EventType.ORDER_CONFIRMED, {}))
    if step is Step.CANCEL:
        return Decision(_enter(state, Step.CANCELLED, now_unix),
                        (EventType.ORDER_CANCELLED, {"reason": state.reason}))

    if result.outcome is Outcome.OK:
        if step is Step.RESERVE:
            return Decision(_enter(state, Step.CHARGE, now_unix, reserve_open=True),
                            (EventType.STOCK_RESERVED, {}))
        if step is Step.CHARGE:
            # The pivot: once charged, only forward.
            return Decision(_enter(state, Step.CONFIRM, now_unix, charge_open=True),
                            (EventType.PAYMENT_CHARGED,
                             {"amount_cents": int(result.data.get("amount_cents", 0))}))
        if step is Step.REFUND:
            after = replace(state, charge_open=False)
            return Decision(_enter(after, _next_compensation(after), now_unix),
                            (EventType.PAYMENT_REFUNDED,
                             {"refunded": bool(result.data.get("refunded", False)),
                              "amount_cents": int(result.data.get("amount_cents", 0))}))
        # RELEASE
        after = replace(state, reserve_open=False)
        return Decision(_enter(after, _next_compensation(after), now_unix),
                        (EventType.STOCK_RELEASED,
                         {"released": bool(result.data.get("released", False))}))

    if step.compensation:
        # Retried until it succeeds (a BUSINESS answer to a compensation breaks the
        # participant's contract; retrying is still the only safe move).
        failures = state.attempts + 1
        return Decision(replace(state, attempts=failures), None, policy.backoff_s(failures))

    # A forward step failed.
    gave_up_s: float | None = None
    if result.outcome is Outcome.TRANSIENT:
        if now_unix - state.step_since_unix < policy.step_budget_s:
            failures = state.attempts + 1
            return Decision(replace(state, attempts=failures), None, policy.backoff_s(failures))
        gave_up_s = policy.step_budget_s
    ambiguous = gave_up_s is not None
    reason = _failure_reason(step, result, gave_up_s)
    if step is Step.RESERVE:
        failed = replace(state, reason=reason, reserve_open=ambiguous)
        event_type = EventType.RESERVE_FAILED
    else:
        failed = replace(state, reason=reason, charge_open=ambiguous)
        event_type = EventType.CHARGE_FAILED
    return Decision(_enter(failed, _next_compensation(failed), now_unix),
                    (event_type,
                     {"reason": reason, "code": result.code, "ambiguous": ambiguous}))
