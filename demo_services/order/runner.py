"""Runs sagas: ``SagaRunner`` drives one leased saga step by step (the I/O around the pure
``saga.advance``); ``SagaManager`` runs them on a thread pool, the ones this replica creates
and, from a recovery thread scanning every ``lease_s / 4``, any whose lease expired (a replica
that died, stalled or stopped).

Each attempt: renew the lease, call the participant (or do the local step), classify the
result, and store the decision (event + read model + saga state, one fenced transaction)
before the next attempt. A replica killed at any point leaves the saga at its last stored
step; the next runner repeats that step, which the participants answer idempotently.

The clock (unix seconds, shared by the replicas of a host) and the sleep are injectable, so
tests drive time by hand.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from demo_services.common.errors import BusinessError

from .participants import ParticipantError, Participants
from .saga import Outcome, SagaPolicy, SagaState, Step, StepResult, advance
from .store import OrderInputs, OrderStore

log = logging.getLogger("demo.order.saga")

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class SagaRunner:
    """Drives sagas whose lease ``owner`` holds, to a terminal state.

    ``lease_s``: how long a claim or renewal holds a saga; ``policy``: step budget and
    backoff; ``clock()``: unix seconds; ``sleep(s)``: waits (default: until ``stopping`` is set
    or ``s`` passed); ``on_step(order_id, step)`` is called before each attempt (tracing,
    tests); ``on_change(order_id)`` after each stored decision."""

    def __init__(self, store: OrderStore, participants: Participants, owner: str, *,
                 lease_s: float = 5.0, policy: SagaPolicy = SagaPolicy(),
                 clock: Clock = time.time, sleep: Sleep | None = None,
                 stopping: threading.Event | None = None,
                 on_step: Callable[[str, Step], None] | None = None,
                 on_change: Callable[[str], None] | None = None) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        self.store = store
        self.participants = participants
        self.owner = owner
        self.lease_s = lease_s
        self.policy = policy
        self.clock = clock
        self.stopping = stopping or threading.Event()
        self.sleep: Sleep = sleep or self._wait
        self.on_step = on_step
        self.on_change = on_change
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()

    def _wait(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def _count(self, key: str) -> None:
        with self._counters_lock:
            self.counters[key] += 1

    def run(self, order_id: str) -> SagaState | None:
        """Drive the saga ``order_id`` (whose lease this runner holds) until it is terminal.

        Returns the terminal state, or None if the runner let go: the lease is someone else's
        (a newer claim fenced this one), the saga is unknown, or ``stopping`` was set (then the
        lease is released so any replica resumes it at once). Exceptions from the store
        (sqlite3.Error) propagate; the saga stays where its last stored step left it."""
        inputs: OrderInputs | None = None
        while True:
            rec = self.store.load_saga(order_id)
            if rec is None:
                return None
            if rec.state.terminal:
                return rec.state
            if rec.lease_owner != self.owner:
                self._count("lease_lost")
                return None
            if self.stopping.is_set():
                self.store.release([order_id], self.owner)
                return None
            wait_s = rec.next_at_unix - self.clock()
            if wait_s > 0:
                if not self._pause(order_id, wait_s):
                    return None
                continue
            if not self.store.renew(order_id, self.owner, self.clock(), self.lease_s):
                self._count("lease_lost")
                return None
            if inputs is None:
                inputs = self.store.order_inputs(order_id)
                if inputs is None:
                    raise RuntimeError(f"saga {order_id} has no OrderCreated event")
            step = rec.state.step
            if self.on_step is not None:
                self.on_step(order_id, step)
            result = self.attempt(order_id, step, inputs)
            decision = advance(rec.state, result, self.clock(), self.policy)
            view = self.store.commit(order_id, self.owner, rec.revision, decision, self.clock(),
                                     self.lease_s, by=self.owner)
            if view is None:
                self._count("fenced")
                log.info("saga %s: lease taken over during %s; letting go", order_id, step)
                return None
            self._count(f"{step.value}:{result.outcome.value}")
            if decision.event is not None:
                self._log_decision(order_id, rec.state, result, decision.event[0],
                                   decision.state)
            else:
                log.debug("saga %s: %s failed (%s %s), retry %d in %.2f s", order_id,
                          step.value, result.code, result.message, decision.state.attempts,
                          decision.delay_s)
            if self.on_change is not None:
                self.on_change(order_id)

    def _log_decision(self, order_id: str, before: SagaState, result: StepResult,
                      event: str, state: SagaState) -> None:
        """Forward progress at debug; why a saga compensates at info (warning when a step
        was given up after the budget, which may mean a participant is down)."""
        step = before.step
        if result.outcome is Outcome.OK:
            log.debug("saga %s: %s done -> %s (%s)", order_id, step.value, state.step.value,
                      event)
        elif result.outcome is Outcome.BUSINESS:
            log.info("saga %s: %s refused (%s: %s); compensating -> %s", order_id, step.value,
                     result.code, result.message, state.step.value)
        else:
            self._count("gave_up")
            log.warning("saga %s: %s given up after %d attempts (%s); compensating it as "
                        "maybe applied -> %s", order_id, step.value, before.attempts + 1,
                        state.reason, state.step.value)

    def attempt(self, order_id: str, step: Step, inputs: OrderInputs) -> StepResult:
        """One attempt of ``step``: the participant call (or nothing, for a local step),
        classified. Never raises for a participant's failure (an unexpected exception is
        TRANSIENT/UNKNOWN); BaseException (KeyboardInterrupt, a test's simulated crash)
        propagates."""
        if step.local:
            return StepResult.ok()
        p = self.participants
        try:
            if step is Step.RESERVE:
                p.reserve(order_id, list(inputs.items))
                return StepResult.ok()
            if step is Step.CHARGE:
                return StepResult.ok(amount_cents=p.charge(order_id, inputs.customer,
                                                           inputs.amount_cents))
            if step is Step.REFUND:
                refunded = p.refund(order_id)
                return StepResult.ok(refunded=refunded > 0, amount_cents=refunded)
            if step is Step.RELEASE:
                return StepResult.ok(released=p.release(order_id))
        except ParticipantError as err:
            return StepResult(err.outcome, err.code.name, err.message)
        except BusinessError as err:
            return StepResult.failed(err.code, err.message)
        except Exception as err:  # a bug or a library error: maybe applied, so retry
            log.exception("saga %s: %s raised", order_id, step.value)
            return StepResult(Outcome.TRANSIENT, "UNKNOWN", repr(err))
        raise ValueError(f"saga {order_id}: cannot attempt {step.value}")

    def _pause(self, order_id: str, wait_s: float) -> bool:
        """Wait ``wait_s`` seconds, renewing the lease every ``lease_s / 4``. False (lease
        released or lost) if stopping or someone else took the saga."""
        until = self.clock() + wait_s
        while True:
            remaining = until - self.clock()
            if remaining <= 0:
                return True
            self.sleep(min(remaining, self.lease_s / 4))
            if self.stopping.is_set():
                self.store.release([order_id], self.owner)
                return False
            if not self.store.renew(order_id, self.owner, self.clock(), self.lease_s):
                self._count("lease_lost")
                return False

    def resume_expired(self, limit: int = 100, exclude: Collection[str] = ()) -> list[str]:
        """Claim sagas whose lease expired and run each to the end here, in turn (a
        single-threaded recovery pass, e.g. for tests). Returns the claimed order ids."""
        claimed = self.store.claim_expired(self.owner, self.clock(), self.lease_s, limit,
                                           exclude)
        for order_id in claimed:
            self.run(order_id)
        return claimed


class SagaManager:
    """Runs a replica's sagas on ``workers`` threads: ``submit`` those it created (already
    leased), and a recovery thread claims expired ones every ``scan_interval_s`` (default
    ``lease_s / 4``) as long as it has idle workers. ``stop`` lets running sagas stop at their
    next step and releases every lease this replica holds."""

    def __init__(self, runner: SagaRunner, *, workers: int = 32,
                 scan_interval_s: float | None = None) -> None:
        self.runner = runner
        self.workers = workers
        self.scan_interval_s = scan_interval_s or runner.lease_s / 4
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saga")
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[SagaState | None]] = {}
        self._thread: threading.Thread | None = None
        self.recovered = 0

    @property
    def stopping(self) -> threading.Event:
        return self.runner.stopping

    def start(self) -> None:
        """Start the recovery thread (its first scan runs at once)."""
        self._thread = threading.Thread(target=self._recover_loop, name="saga-recovery",
                                        daemon=True)
        self._thread.start()

    def submit(self, order_id: str) -> Future[SagaState | None] | None:
        """Run the saga (leased to this replica) in the background, with the caller's context
        (its ``traceparent``). None if it already runs here or the manager is stopping."""
        with self._lock:
            if self.stopping.is_set() or order_id in self._in_flight:
                return None
            ctx = contextvars.copy_context()
            future = self._executor.submit(ctx.run, self._run, order_id)
            self._in_flight[order_id] = future
        return future

    def _run(self, order_id: str) -> SagaState | None:
        try:
            return self.runner.run(order_id)
        except Exception:
            log.exception("saga %s: runner failed; the lease will expire and it resumes",
                          order_id)
            return None
        finally:
            with self._lock:
                self._in_flight.pop(order_id, None)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._in_flight)

    def recover_once(self) -> list[str]:
        """Claim expired sagas for the idle workers and submit them; returns their ids."""
        with self._lock:
            idle = self.workers - len(self._in_flight)
            busy = set(self._in_flight)
        if idle <= 0 or self.stopping.is_set():
            return []
        r = self.runner
        claimed = r.store.claim_expired(r.owner, r.clock(), r.lease_s, idle, busy)
        for order_id in claimed:
            log.info("saga %s: resumed (its lease expired)", order_id)
            self.submit(order_id)
        self.recovered += len(claimed)
        return claimed

    def _recover_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.recover_once()
            except Exception:
                log.exception("saga recovery scan failed; next scan in %.2f s",
                              self.scan_interval_s)
            self.stopping.wait(self.scan_interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking sagas; wait up to ``timeout_s`` for running ones to reach a step
        boundary; release this replica's leases."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            futures = list(self._in_flight.values())
        wait_futures(futures, timeout=timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:
            released = self.runner.store.release(None, self.runner.owner)
            if released:
                log.info("released %d saga lease(s) for other replicas", released)
        except Exception:
            log.exception("could not release saga leases; they expire in %.1f s",
                          self.runner.lease_s)

    def status(self) -> dict[str, Any]:
        """Counts by step (the whole database), in flight, and this replica's share."""
        r = self.runner
        counts = r.store.saga_counts(r.owner, r.clock())
        with r._counters_lock:
            outcomes = dict(sorted(r.counters.items()))
        return {**counts, "running_here": len(self.running()), "recovered_here": self.recovered,
                "owner": r.owner, "outcomes_here": outcomes}
