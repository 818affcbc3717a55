"""``python -m demo_services.loadgen --rps N [--duration S] [--outbound HOST:PORT]
[--via-gateway URL [--gateway-key-dir DIR]] [--control-listen 127.0.0.1:0] [--paused]``

Creates orders through the mesh (the sidecar's outbound port, authority ``order``) at N per
second, open loop; with ``--via-gateway`` over the API gateway's HTTP/JSON API instead
(``POST /v1/orders``, ``GET /v1/orders/{id}``; a demo bearer token per customer, minted with
the demo's key in ``--gateway-key-dir``, default ``$MESH_DEMO_DIR/gateway``); prints ``{"ready": {...}}`` once its control endpoint serves, then one
line of counts per second, and a summary at the end (after --duration, or on SIGTERM/SIGINT;
the last line is ``{"summary": {...}}``). Exit 0, or 1 if an answer broke idempotency.

Control endpoint: ``POST /pause``, ``POST /resume``, ``GET /stats``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from demo_services.common.control import ControlServer
from demo_services.common.mesh import outbound_channel
from demo_services.common.server import basic_logging, split_hostport
from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.numbers import finite_arg

from .mix import Mix
from .runner import LoadGenerator
from .tally import Tally, one_line

SERVICE = "loadgen"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="python -m demo_services.loadgen",
                              description="Create orders through the mesh, open loop.")
    p.add_argument("--rps", type=finite_arg, required=True, help="orders per second (0: none)")
    p.add_argument("--duration", type=finite_arg, default=None,
                   help="seconds to run (default: until SIGTERM)")
    p.add_argument("--outbound", default="127.0.0.1:15001",
                   help="the sidecar's outbound listener (HOST:PORT)")
    p.add_argument("--via-gateway", default=None, metavar="URL",
                   help="create orders through the API gateway at URL (http://HOST:PORT)")
    p.add_argument("--gateway-key-dir", type=Path, default=None,
                   help="the demo's token key (default $MESH_DEMO_DIR/gateway)")
    p.add_argument("--control-listen", default="127.0.0.1:0",
                   help="the HTTP control endpoint (HOST:PORT; port 0 = a free one)")
    p.add_argument("--paused", action="store_true", help="start paused (POST /resume)")
    p.add_argument("--deadline-s", type=finite_arg, default=5.0, help="CreateOrder's deadline")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="calls in flight at most; a send over it is dropped and counted")
    p.add_argument("--seed", type=int, default=None, help="seed of the mix (default: random)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.rps < 0 or (args.duration is not None and args.duration <= 0):
        p.error("--rps must be >= 0 and --duration > 0")
    if args.deadline_s <= 0:
        p.error("--deadline-s must be > 0")
    if args.via_gateway is not None and not args.via_gateway.startswith(("http://",
                                                                         "https://")):
        p.error("--via-gateway: expected http://HOST:PORT or https://HOST:PORT")
    try:
        split_hostport(args.outbound)
        split_hostport(args.control_listen)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    basic_logging(args.log_level)
    clock = time.monotonic
    tally = Tally(started_at=clock())
    channel = outbound_channel(args.outbound, "order")
    client = None
    if args.via_gateway:
        from demo_services.gateway.keys import demo_key_dir

        from .via_gateway import GatewayOrderClient, TokenCache, demo_minter
        client = GatewayOrderClient(args.via_gateway,
                                    TokenCache(demo_minter(args.gateway_key_dir
                                                           or demo_key_dir())),
                                    max_in_flight=args.max_in_flight)
    gen = LoadGenerator(channel, args.rps, Mix(random.Random(args.seed)), tally,
                        deadline_s=args.deadline_s, max_in_flight=args.max_in_flight,
                        paused=args.paused, clock=clock, stub=client)

    def stats(body: Any) -> tuple[int, Any]:
        return 200, {**tally.snapshot(clock()), "paused": gen.paused, "target_rps": args.rps}

    def pause(body: Any) -> tuple[int, Any]:
        gen.pause()
        return 200, {"paused": True, "in_flight": tally.in_flight}

    def resume(body: Any) -> tuple[int, Any]:
        gen.resume()
        return 200, {"paused": False, "in_flight": tally.in_flight}

    host, port = split_hostport(args.control_listen)
    control = ControlServer(host, port, {("GET", "/stats"): stats, ("POST", "/pause"): pause,
                                         ("POST", "/resume"): resume})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    control.start()
    gen.start()
    print(json.dumps({"ready": {"control": control.address, "outbound": args.outbound,
                                "via_gateway": args.via_gateway or "",
                                "service": SERVICE, "rps": args.rps, "paused": gen.paused}}),
          flush=True)
    end = None if args.duration is None else clock() + args.duration
    while not stop.wait(1.0):
        print(f"loadgen: {one_line(tally.snapshot(clock()))}"
              f"{' (paused)' if gen.paused else ''}", flush=True)
        if end is not None and clock() >= end:
            break
    gen.stop(wait_s=args.deadline_s + 1.0)
    doc = tally.snapshot(clock())
    print(f"loadgen: summary: {one_line(doc)}", flush=True)
    if doc["cancel_reasons"]:
        print("loadgen: cancelled because: " + ", ".join(
            f"{k} {v}" for k, v in sorted(doc["cancel_reasons"].items())), flush=True)
    print(json.dumps({"summary": doc}), flush=True)
    control.stop()
    if client is not None:
        client.close()
    channel.close()
    return 1 if doc["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
