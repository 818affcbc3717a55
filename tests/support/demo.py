"""One demo mesh for a test module, as a user runs it: ``python -m demo_services.demo up``
on free ports in a tmp dir (by environment), and ``down`` at the end, asserting nothing it
started is left running. ``Demo`` reaches each service through the outbound port of a sidecar
whose service the demo's authorization lets call it (it denies by default): order through the
load generator's outbound-only sidecar, payment and inventory through an order replica's
sidecar (``CALLER``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from demo_services.launcher.procs import is_ours
from demo_services.launcher.state import DemoState, ProcessRecord
from demo_services.launcher.state import load as load_state
from protos.inventory import inventory_pb2_grpc
from protos.order import order_pb2, order_pb2_grpc
from protos.payment import payment_pb2_grpc
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

CALLER = {"payment": "order", "inventory": "order"}
"""Whose sidecar a test calls a service through (default: the load generator's): the demo's
policies let loadgen call order only, and order call payment and inventory."""


@dataclass
class Demo:
    base: Path
    env: dict[str, str]
    state: DemoState
    channels: dict[str, grpc.Channel]

    def cli(self, module: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", module, *args], env=self.env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout_s)

    def demo(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("demo_services.demo", *args)

    def channel(self, authority: str) -> grpc.Channel:
        """Through the outbound port (h2c) of a sidecar allowed to call ``authority``: the
        load generator's, or for payment and inventory the last order replica's
        (``CALLER``)."""
        if authority not in self.channels:
            caller = CALLER.get(authority, "loadgen")
            outbound = self.state.find("sidecar", caller)[-1].outbound
            self.channels[authority] = grpc.insecure_channel(
                outbound, options=[("grpc.default_authority", authority)])
        return self.channels[authority]

    def order(self) -> order_pb2_grpc.OrderStub:
        return order_pb2_grpc.OrderStub(self.channel("order"))

    def payment(self) -> payment_pb2_grpc.PaymentStub:
        return payment_pb2_grpc.PaymentStub(self.channel("payment"))

    def inventory(self) -> inventory_pb2_grpc.InventoryStub:
        return inventory_pb2_grpc.InventoryStub(self.channel("inventory"))

    def app(self, instance: str) -> ProcessRecord:
        return self.state.one("app", instance=instance)

    def control(self, rec: ProcessRecord, method: str, path: str,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else (
            b"" if method != "GET" else None)
        req = urllib.request.Request(f"http://{rec.control}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    def all_orders(self) -> list[order_pb2.OrderView]:
        out: list[order_pb2.OrderView] = []
        token = ""
        while True:
            resp = self.order().ListOrders(order_pb2.ListOrdersRequest(page_size=1000,
                                                                       page_token=token),
                                           timeout=10)
            out += resp.orders
            token = resp.next_page_token
            if not token:
                return out

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()


def demo_env(base: Path, *, rps: float, lease_s: float) -> dict[str, str]:
    """The environment of a demo under ``base`` on free ports, with short timers."""
    ports: list[int] = []
    while len(ports) < 5:
        port = procs.free_port()
        if port not in ports:
            ports.append(port)
    api, boot, admin_http, otlp, gateway = ports
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "MESH_DEMO_DIR": str(base / ".mesh"), "MESH_CERTS_DIR": str(base / "certs"),
            "MESH_CONTROL_PLANE": f"127.0.0.1:{api}", "MESH_DEMO_BOOTSTRAP": f"127.0.0.1:{boot}",
            "MESH_DEMO_ADMIN_HTTP": f"127.0.0.1:{admin_http}",
            "MESH_DEMO_OTLP": f"127.0.0.1:{otlp}", "MESH_DEMO_GATEWAY": f"127.0.0.1:{gateway}",
            "MESH_DEMO_RPS": str(rps), "MESH_DEMO_LEASE_S": str(lease_s),
            "MESH_DEMO_REPORT_INTERVAL_S": "1", "MESH_DEMO_HEALTH_INTERVAL_S": "0.5",
            "MESH_DEMO_GRACE_PERIOD_S": "5", "MESH_DEMO_STOP_TIMEOUT_S": "10"}


@contextmanager
def running_demo(base: Path, env: dict[str, str]) -> Iterator[Demo]:
    """``demo up`` with ``env``; yields the running demo; ``demo down`` afterwards."""
    up = subprocess.run([sys.executable, "-m", "demo_services.demo", "up"], env=env,
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    state_path = base / ".mesh" / "state.json"
    d = Demo(base, env, load_state(state_path) if state_path.exists() else None, {})  # type: ignore[arg-type]
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield d
    finally:
        d.close()
        down = d.demo("down")
        assert down.returncode == 0, down.stderr
        if d.state is not None:
            left = [p for p in d.state.processes if is_ours(p)]
            assert not left, f"left running: {left}"
