"""h2load (nghttp2-client) for gRPC: the request body file, a bounded run, and its parsing.

h2load judges a request by its HTTP status only, and a gRPC error still answers 200, so a run
is also checked against the response body bytes it received: a failed gRPC call answers
trailers-only, without a message, so `data` falls short of requests x response size.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError
from protos.meshtest import echo_pb2

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
UNARY_PATH = "/meshtest.Echo/Unary"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag byte 0, 4-byte big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def write_unary_body(path: Path, message_bytes: int = 64) -> int:
    """Write a framed EchoRequest whose protobuf encoding is exactly `message_bytes` long.

    Returns the size in bytes of the framed response the backend answers it with (Unary echoes
    the payload), which is what h2load counts as response `data` per request.
    """
    payload = b"x" * (message_bytes - 2)  # field tag + 1-byte length
    request = echo_pb2.EchoRequest(payload=payload).SerializeToString()
    if len(request) != message_bytes:
        raise ValueError(f"cannot build a {message_bytes}-byte EchoRequest (got {len(request)})")
    path.write_bytes(grpc_frame(request))
    return len(grpc_frame(echo_pb2.EchoResponse(payload=payload).SerializeToString()))


@dataclass(frozen=True)
class H2loadResult:
    """The counters of one run (requests, HTTP 2xx, response body bytes) and its rate (req/s)."""

    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    data_bytes: int
    elapsed_s: float
    req_per_s: float
    output: str


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_DATA = re.compile(r"traffic: .*?, [\d.]+\w* \((\d+)\) data")
_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse(output: str) -> H2loadResult:
    """Parse h2load's summary; raises BenchError if a line is missing."""
    req, status, data, fin = (p.search(output) for p in (_REQUESTS, _STATUS, _DATA, _FINISHED))
    if not (req and status and data and fin):
        raise BenchError(f"cannot parse h2load output:\n{output[-2000:]}")
    counts = [int(x) for x in req.groups()]
    return H2loadResult(
        *counts,
        status_2xx=int(status.group(1)),
        data_bytes=int(data.group(1)),
        elapsed_s=float(fin.group(1)) * _UNIT_S[fin.group(2)],
        req_per_s=float(fin.group(3)),
        output=output,
    )


def h2load_binary() -> str:
    """Path of h2load; BenchError if it is not installed."""
    path = shutil.which("h2load")
    if path is None:
        raise BenchError("h2load not found: `make install` installs nghttp2-client")
    return path


def run(
    url: str,
    body: Path,
    *,
    requests: int,
    clients: int,
    streams: int,
    authority: str | None = None,
    rps_per_client: float | None = None,
    log_file: Path | None = None,
    timeout_s: float = 120,
) -> H2loadResult:
    """Run h2load for exactly `requests` POSTs of `body` to `url` (bounded by `timeout_s` seconds).

    `authority` overrides :authority (the mesh's outbound routes by it). With `rps_per_client`
    each client sends at that rate (requests per second). `log_file` must not exist yet: h2load
    appends to it. Raises BenchError on a non-zero exit, a timeout or unparsable output.
    """
    cmd = [h2load_binary(), "-n", str(requests), "-c", str(clients), "-m", str(streams), "-d", str(body)]
    for header in GRPC_HEADERS:
        cmd += ["-H", header]
    if authority is not None:
        cmd += ["-H", f":authority: {authority}"]
    if rps_per_client is not None:
        cmd += ["--rps", f"{rps_per_client:g}"]
    if log_file is not None:
        if log_file.exists():
            raise BenchError(f"h2load log file {log_file} exists: h2load would append to it")
        cmd += ["--log-file", str(log_file)]
    # Give up on a stuck connection rather than waiting forever.
    cmd += ["-T", f"{int(timeout_s)}s", "-N", "30s", url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 10)
    except subprocess.TimeoutExpired:
        raise BenchError(f"h2load did not finish in {timeout_s + 10:.0f} s: {' '.join(cmd)}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise BenchError(f"h2load exited {proc.returncode}: {' '.join(cmd)}\n{out[-2000:]}")
    return parse(out)


def check_complete(result: H2loadResult, requests: int, response_bytes: int, what: str) -> None:
    """BenchError unless all `requests` succeeded with HTTP 2xx and a full response message each.

    `response_bytes` is the framed response size per request (see write_unary_body).
    """
    problems = []
    if not (result.total == result.done == result.succeeded == requests):
        problems.append(
            f"{result.succeeded} of {requests} requests succeeded ({result.done} done, "
            f"{result.failed} failed, {result.errored} errored, {result.timeout} timed out)"
        )
    if result.status_2xx != requests:
        problems.append(f"{result.status_2xx} of {requests} answered 2xx")
    if result.data_bytes < requests * response_bytes:
        problems.append(
            f"{result.data_bytes} response bytes, expected {requests} x {response_bytes}: "
            "some calls ended without a message (gRPC error)"
        )
    if problems:
        summary = result.output[result.output.find("finished in"):]
        raise BenchError(f"{what}: " + "; ".join(problems) + f"\n--- h2load summary ---\n{summary.strip()}")


@dataclass(frozen=True)
class Latency:
    """Per-request latency from an h2load log: count and percentiles in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of ascending `sorted_values`, by linear interpolation."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def read_latency_log(log_file: Path, requests: int, what: str) -> list[float]:
    """The per-request durations (µs, third column) of an h2load --log-file.

    BenchError unless the log has exactly `requests` rows, all HTTP 200.
    """
    durations_us: list[float] = []
    bad_status = 0
    for line in log_file.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) < 3:
            continue
        if cols[1] != "200":
            bad_status += 1
        durations_us.append(float(cols[2]))
    if len(durations_us) != requests or bad_status:
        raise BenchError(
            f"{what}: latency log {log_file} has {len(durations_us)} rows (expected {requests}), "
            f"{bad_status} not HTTP 200"
        )
    return durations_us


def latency_of(durations_us: list[float]) -> Latency:
    """Count, p50 and p99 (ms) of request durations in µs (any order; ValueError if none)."""
    ordered = sorted(durations_us)
    return Latency(count=len(ordered), p50_ms=percentile(ordered, 50) / 1000,
                   p99_ms=percentile(ordered, 99) / 1000)
