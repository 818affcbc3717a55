"""``python -m bench.cold``: the relay between in-memory peers really relays every timed call
(each ends with grpc-status 0 at the caller, through the bare relay and through the
sidecar's outbound and inbound stacks), the figures come out for both traversals cold and
warm, the splice reference forwards a request with its stream ids mapped, and a bad
argument gets one line and exit 2. No timing is asserted."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench import cold
from mesh_common.limits import Limits
from sidecar.http2.connection import H2Connection


def test_every_stack_relays_the_timed_calls_and_reports_both_traversals(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cold.json"
    assert cold.main(["--calls", "4", "--evict-mib", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["stacks"]) == {"bare", "outbound", "inbound"}
    for figures in doc["stacks"].values():
        assert figures["calls_ok"] == 9  # 4 cold, 4 warm, 1 counted; every one OK at the caller
        for key in ("down_received_opcodes", "up_received_opcodes"):
            assert figures[key] > doc["splice_opcodes"] > 0  # a relay does more than a splice
        for mode in ("cold", "warm"):
            for key in ("down_received_us", "up_received_us"):
                q = figures[mode][key]
                assert 0 < q["p25"] <= q["p50"] <= q["p75"]
    assert set(doc["calibration_us"]) == {"hash(bytes)", "new slotted object", "bytes slice",
                                          "splice of a request"}
    table = capsys.readouterr().out
    assert "request (down_received)" in table and "response (up_received)" in table
    assert "opcodes" in table


def test_count_opcodes_counts_the_instructions_a_call_runs() -> None:
    def loop(n: int) -> int:
        total = 0
        for i in range(n):
            total += i
        return total
    one, hundred = cold.count_opcodes(lambda: loop(1)), cold.count_opcodes(lambda: loop(100))
    assert 0 < one < hundred
    assert hundred - one >= 99 * 3  # each more pass runs at least FOR_ITER, STORE, the add
    assert cold.count_opcodes(lambda: None) == 0  # the wrapper's own opcodes are not counted
    assert cold.count_opcodes(lambda: loop(0)) > 0


def test_the_harness_counts_a_call_that_does_not_end_ok() -> None:
    h = cold.Harness("bare")
    h.relay.down_received(h.down, h.request())
    assert h.up is None  # the relay asked for a connection; the call waits for it
    h.connect()
    assert h.up is not None
    h.relay.up_received(h.up, h.answer())
    assert h.deliver() == "0"
    h.relay.down_received(h.down, h.request())
    h.backend.receive(h.up.data_to_send())  # the backend swallows this one: no answer
    assert h.deliver() is None


def test_the_splice_maps_stream_ids_and_keeps_the_frames() -> None:
    caller = H2Connection(client=True, limits=Limits())
    caller.initiate()
    caller.data_to_send()
    splice = cold.Splice()
    first, second = cold.unary_request(caller), cold.unary_request(caller)
    for read, up_id in ((first, 1), (second, 3)):
        out = splice.request(read)
        assert len(out) == len(read)
        pos = 0
        while pos < len(out):
            hi, lo, _t, _f, sid = struct.unpack_from(">HBBBL", out, pos)
            assert sid == up_id
            pos += 9 + ((hi << 8) | lo)
    assert splice.routed == 2


@pytest.mark.parametrize("argv", [["--calls", "0"], ["--evict-mib", "-1"]])
def test_a_bad_argument_gets_one_line_and_exit_2(argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cold.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be positive" in err[0]
