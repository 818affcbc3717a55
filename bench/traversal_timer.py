"""``python bench/traversal_timer.py OUT.jsonl [mesh-sidecar arguments...]``

Runs a sidecar (of whichever tree ``PYTHONPATH`` names) with every read it relays timed, for
``bench.ab --split``: a diagnostic, not a way to run a sidecar. Per read it records when it
came (``time.monotonic``, s), which side it came from (``request``: a downstream connection,
``response``: an upstream one) and, in µs: the relay's processing up to the write
(``process``), the first write it caused (``write``: ``H2Protocol.flush`` of a connection with
bytes queued), from the read to the end of that write (``to_write``), both -1 when the read
wrote nothing before its callback returned, and what the callback did after its writes
(``after``). Each sample costs a few clock reads. The samples
are written to OUT.jsonl, one JSON object per line, when the sidecar exits (SIGTERM).

It is run as a file, not with ``-m``, so the tree under test need not have it.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path
from typing import Any


def install(out: Path) -> None:
    """Wrap ``sidecar.io``'s read callback, flusher and flush with clocks; dump at exit."""
    from sidecar import io

    clock = time.perf_counter
    mono = time.monotonic
    samples: list[tuple[float, str, float, float, float, float]] = []
    read: list[Any] = [None]  # the read being timed: [t0, side, t1, write, to_write, t_after]

    data_received = io.H2Protocol.data_received
    after_read = io.Flusher.after_read
    flush = io.H2Protocol.flush

    def timed_data_received(self: Any, data: bytes) -> None:
        t0 = clock()
        cur = read[0] = [t0, "response" if self.conn.client else "request", t0, -1.0, -1.0, t0]
        came = mono()
        data_received(self, data)
        samples.append((came, cur[1], (cur[2] - t0) * 1e6, cur[3], cur[4],
                        (clock() - cur[5]) * 1e6))
        read[0] = None

    def timed_after_read(self: Any) -> None:
        cur = read[0]
        if cur is not None:
            cur[2] = clock()
        after_read(self)
        if cur is not None:
            cur[5] = clock()

    def timed_flush(self: Any) -> None:
        cur = read[0]
        if cur is None or cur[3] >= 0 or not self.conn._out:
            flush(self)
            return
        tw = clock()
        flush(self)
        end = clock()
        cur[3] = (end - tw) * 1e6
        cur[4] = (end - cur[0]) * 1e6

    io.H2Protocol.data_received = timed_data_received  # type: ignore[method-assign]
    io.Flusher.after_read = timed_after_read  # type: ignore[method-assign]
    io.H2Protocol.flush = timed_flush  # type: ignore[method-assign]

    def dump() -> None:
        with out.open("w") as f:
            for came, side, process, write, to_write, after in samples:
                f.write(json.dumps({"t": came, "side": side, "process": round(process, 1),
                                    "write": round(write, 1), "to_write": round(to_write, 1),
                                    "after": round(after, 1)}) + "\n")
    atexit.register(dump)


def main(argv: list[str]) -> None:
    if not argv:
        print("usage: python bench/traversal_timer.py OUT.jsonl [mesh-sidecar arguments...]",
              file=sys.stderr)
        sys.exit(2)
    install(Path(argv[0]))
    from sidecar.main import main as sidecar_main
    sidecar_main(argv[1:])


if __name__ == "__main__":
    sys.path.pop(0)  # this file's directory: the tree under test comes from PYTHONPATH
    main(sys.argv[1:])
