"""Tap sessions without a network: which sidecars a tap asks, which events it streams, its
bounds, and what it tells the sidecars when it starts and ends."""

from __future__ import annotations

import itertools

import pytest

from control_plane.tap import (
    DEFAULT_TAP_DURATION_S,
    MAX_BUFFERED_EVENTS,
    MAX_TAP_DURATION_S,
    SIDECAR_EVENTS_PER_S,
    TapError,
    TapHub,
    method_matches,
    tap_spec,
)
from protos.mesh.v1 import control_pb2 as pb

ORDER_1 = ("order", "order-1")
PAYMENT_1 = ("payment", "payment-1")
INVENTORY_1 = ("inventory", "inventory-1")


def hub() -> TapHub:
    ids = itertools.count(1)
    return TapHub(new_id=lambda: f"tap-{next(ids)}")


def ev(direction: str, source: str, destination: str, method: str = "/p.P/Charge",
       instance: str = "liar") -> pb.TapEvent:
    return pb.TapEvent(direction=direction, source=source, destination=destination,
                       method=method, instance=instance, status="OK", latency_ms=1.5)


def batch(tap_id: str, *events: pb.TapEvent, dropped: int = 0) -> pb.TapEvents:
    return pb.TapEvents(id=tap_id, events=list(events), dropped=dropped)


def test_a_tap_request_is_validated_and_its_duration_defaulted_and_capped() -> None:
    assert tap_spec("payment", "", 0, 0).duration_s == DEFAULT_TAP_DURATION_S
    assert tap_spec("payment", "/p.P/", 1e9, 5).duration_s == MAX_TAP_DURATION_S
    assert tap_spec("payment", "/p.P/Charge", 2.5, 0).duration_s == 2.5
    for args, field in [(("", "", 1, 0), "service"), (("pay ment", "", 1, 0), "service"),
                        (("payment", "p.P/Charge", 1, 0), "method"),
                        (("payment", "/p P", 1, 0), "method"),
                        (("payment", "", -1, 0), "duration_s"),
                        (("payment", "", float("nan"), 0), "duration_s"),
                        (("payment", "", 1, -1), "max_events")]:
        with pytest.raises(TapError, match=field):
            tap_spec(*args)


def test_method_filters_are_exact_or_a_prefix_ending_in_a_slash() -> None:
    assert method_matches("", "/a.B/C")
    assert method_matches("/a.B/", "/a.B/C")
    assert not method_matches("/a.B/", "/a.Bc/C")
    assert method_matches("/a.B/C", "/a.B/C")
    assert not method_matches("/a.B/C", "/a.B/Cd")


def test_a_tap_asks_the_services_sidecars_and_every_possible_caller_only() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "/p.P/", 10, 0), now=100.0)
    (start,) = h.start(PAYMENT_1, has_outbound=False, now=100.0)
    assert start.tap_start == pb.TapStart(id="tap-1", method="/p.P/", duration_s=10,
                                          max_events_per_s=SIDECAR_EVENTS_PER_S)
    assert len(h.start(ORDER_1, has_outbound=True, now=104.0)) == 1  # may call payment
    assert h.start(INVENTORY_1, has_outbound=False, now=104.0) == []  # cannot
    assert tap.targets == {PAYMENT_1, ORDER_1}


def test_a_sidecar_that_connects_later_is_asked_for_the_remaining_time_only() -> None:
    h = hub()
    h.open(tap_spec("payment", "", 10, 0), now=100.0)
    (start,) = h.start(PAYMENT_1, False, now=107.0)
    assert start.tap_start.duration_s == pytest.approx(3.0)
    assert h.start(PAYMENT_1, False, now=111.0) == []  # the tap is over


def test_events_of_the_service_and_of_its_callers_outbound_calls_are_streamed() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "", 10, 0), now=0.0)
    for key in (PAYMENT_1, ORDER_1):
        h.start(key, True, now=0.0)
    assert h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "order", "payment"),
                                      ev("outbound", "payment", "bank"))) == 2
    assert h.deliver(ORDER_1, batch(tap.id, ev("outbound", "order", "payment"),
                                    ev("outbound", "order", "inventory"),
                                    ev("inbound", "gateway", "order"))) == 1
    got = tap.take()
    assert [(e.instance, e.direction, e.destination) for e in got] == [
        ("payment-1", "inbound", "payment"), ("payment-1", "outbound", "bank"),
        ("order-1", "outbound", "payment")]
    assert tap.take() == []


def test_an_inbound_event_at_another_service_whose_caller_is_the_service_is_left_out() -> None:
    h = hub()
    tap = h.open(tap_spec("order", "", 10, 0), now=0.0)
    h.start(PAYMENT_1, True, now=0.0)
    assert h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "order", "payment"))) == 0


def test_events_from_sidecars_not_asked_or_for_unknown_taps_are_ignored() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "", 10, 0), now=0.0)
    assert h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "order", "payment"))) == 0
    h.start(PAYMENT_1, False, now=0.0)
    assert h.deliver(PAYMENT_1, batch("tap-404", ev("inbound", "order", "payment"))) == 0


def test_the_method_filter_is_checked_again_by_the_control_plane() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "/p.P/Charge", 10, 0), now=0.0)
    h.start(PAYMENT_1, False, now=0.0)
    assert h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "o", "payment", "/p.P/Refund"),
                                      ev("inbound", "o", "payment", "/p.P/Charge"))) == 1


def test_max_events_bounds_the_tap_and_marks_it_exhausted() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "", 10, 3), now=0.0)
    h.start(PAYMENT_1, False, now=0.0)
    assert h.deliver(PAYMENT_1, batch(tap.id, *[ev("inbound", "o", "payment")] * 5)) == 3
    assert tap.exhausted and len(tap.take()) == 3


def test_a_slow_reader_loses_events_past_the_buffer_and_they_are_counted() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "", 10, 0), now=0.0)
    h.start(PAYMENT_1, False, now=0.0)
    events = [ev("inbound", "o", "payment")] * (MAX_BUFFERED_EVENTS + 7)
    assert h.deliver(PAYMENT_1, batch(tap.id, *events, dropped=4)) == MAX_BUFFERED_EVENTS
    assert tap.dropped == 7 + 4
    assert not tap.exhausted


def test_notify_is_called_when_events_are_queued_only() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "/p.P/Charge", 10, 0), now=0.0)
    h.start(PAYMENT_1, False, now=0.0)
    calls: list[int] = []
    tap.notify = lambda: calls.append(1)
    h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "o", "payment", "/p.P/Refund")))
    assert calls == []
    h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "o", "payment", "/p.P/Charge")))
    assert calls == [1]


def test_closing_a_tap_returns_the_sidecars_to_stop_once() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "", 10, 0), now=0.0)
    h.start(PAYMENT_1, False, now=0.0)
    h.start(ORDER_1, True, now=0.0)
    assert h.close(tap) == {PAYMENT_1, ORDER_1}
    assert tap.stop_message().tap_stop.id == tap.id
    assert h.close(tap) == set()
    assert len(h) == 0
    assert h.deliver(PAYMENT_1, batch(tap.id, ev("inbound", "o", "payment"))) == 0
    assert h.start(PAYMENT_1, False, now=1.0) == []


def test_tap_ids_are_unique() -> None:
    h = TapHub()
    spec = tap_spec("payment", "", 10, 0)
    assert len({h.open(spec, 0.0).id for _ in range(50)}) == 50


def test_ending_every_tap_wakes_their_streams_and_starts_no_more() -> None:
    h = hub()
    tap = h.open(tap_spec("payment", "", 60, 0), now=10.0)
    woken: list[int] = []
    tap.notify = lambda: woken.append(1)
    h.end_all()
    assert woken == [1] and tap.expires_at <= 10.0
    assert h.start(PAYMENT_1, False, now=10.0) == []
