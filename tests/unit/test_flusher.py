"""``sidecar.io.Flusher``: writes shared per loop iteration, and at once for a read alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidecar.io import Flusher

pytestmark = pytest.mark.timeout(10)


class FakeLoop:
    """Records ``call_soon`` callbacks (run by ``run_soon``): a stand-in for the event loop."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for fn in soon:
            fn()


class FakeProto:
    """Counts ``flush`` calls: a stand-in for an H2Protocol."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def _flusher(now: list[float]) -> tuple[Flusher, FakeLoop]:
    loop = FakeLoop()
    return Flusher(loop, quiet_s=0.001, clock=lambda: now[0]), loop  # type: ignore[arg-type]


def test_reads_close_together_share_one_write_per_loop_pass() -> None:
    now = [100.0]
    flusher, loop = _flusher(now)
    a, b = FakeProto(), FakeProto()
    flusher.after_read()  # a read alone: nothing was queued
    now[0] += 0.0001
    flusher.want(a)  # type: ignore[arg-type]
    flusher.after_read()  # 0.1 ms after the previous read: wait for the loop pass
    now[0] += 0.0001
    flusher.want(b)  # type: ignore[arg-type]
    flusher.after_read()
    assert (a.flushes, b.flushes) == (0, 0)
    assert len(loop.soon) == 1
    loop.run_soon()
    assert (a.flushes, b.flushes) == (1, 1)


def test_a_read_alone_writes_at_once() -> None:
    now = [100.0]
    flusher, loop = _flusher(now)
    a = FakeProto()
    flusher.want(a)  # type: ignore[arg-type]
    flusher.after_read()  # the first read: nobody read before it
    assert a.flushes == 1
    now[0] += 0.005  # 5 ms later: alone again
    flusher.want(a)  # type: ignore[arg-type]
    flusher.after_read()
    assert a.flushes == 2
    loop.run_soon()  # the scheduled passes find nothing left to write
    assert a.flushes == 2


def test_a_read_that_queued_nothing_writes_nothing() -> None:
    now = [100.0]
    flusher, loop = _flusher(now)
    flusher.after_read()
    now[0] += 1.0
    flusher.after_read()
    assert flusher.pending == [] and loop.soon == []


def test_the_default_clock_is_monotonic() -> None:
    flusher = Flusher(FakeLoop())  # type: ignore[arg-type]
    a: Any = FakeProto()
    flusher.want(a)
    flusher.after_read()
    assert a.flushes == 1
