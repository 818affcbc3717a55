"""The Registry contract (control_plane.registry), one suite for every backend.

The ``backend`` fixture runs each test against:

* ``embedded``: the default registry, in memory with SQLite under the test's tmp dir;
* ``consul_standin``: the Consul registry against tests/support/consul_standin.py (a test
  double of Consul's HTTP API, started as a process with an ACL token the registry must send);
* ``consul_live``: the Consul registry against a real Consul, only when ``CONSUL_HTTP_ADDR``
  is set (e.g. ``consul agent -dev`` and ``CONSUL_HTTP_ADDR=127.0.0.1:8500``; a token in
  ``CONSUL_HTTP_TOKEN`` if ACLs are on). Each test works under its own Consul prefix and
  deregisters what it left at the end.

Method calls are synchronous and their effect on the registry itself is immediate for every
backend; what another registry (a restarted one, a second replica) sees through Consul is
eventually consistent, so those checks poll with a deadline (``eventually``: an async poll,
as the registries' watches deliver on this event loop). Consul-only behaviour (replicas,
TTL lapse, outages) runs over the two Consul ids, and one test starts ``mesh-control-plane
--registry consul://...`` with a real sidecar.

Timers are short: TTL 1 s, grace 1 s, blocking queries of 2 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import consul
import pytest

from control_plane.consul_conn import connect, target_from_env, url_from_http_addr
from control_plane.registry import (
    NOT_SERVING,
    SERVING,
    UNKNOWN,
    Instance,
    Registry,
    sort_labels,
)
from control_plane.registry.consul import ConsulRegistry, check_id, service_id
from control_plane.registry.embedded import EmbeddedRegistry
from control_plane.store import Store
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.integration.test_control_plane import (
    ControlPlaneProc,
    admin_channel,
    create_token,
    meshctl,
)
from tests.integration.test_dynamic_sidecar import sidecar_cmd
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(90)

GRACE_S = 1.0
TTL_S = 1.0
WAIT_S = 2.0
TOKEN = "contract-test-token"
TD = "mesh.local"
LIVE_SKIP = ("CONSUL_HTTP_ADDR is not set: no live Consul to test against "
             "(run `consul agent -dev` and set CONSUL_HTTP_ADDR=127.0.0.1:8500)")


# -- helpers -------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], Any], timeout_s: float = 15.0,
                     what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) while the event loop
    keeps running (the registries' watches deliver on it); exceptions count as "not yet".
    AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = None
        except Exception as exc:  # "not yet"
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}"
                                 + (f" (last error: {last!r})" if last else ""))
        await asyncio.sleep(0.05)


def sample(service: str = "echo", iid: str = "echo-1", **kw: Any) -> Instance:
    base: dict[str, Any] = dict(
        service=service, instance_id=iid, spiffe_id=f"spiffe://{TD}/service/{service}",
        inbound="127.0.0.1:7001", outbound="127.0.0.1:7002", admin="127.0.0.1:7003",
        labels=sort_labels({"version": "v1", "zone": "a"}), health=SERVING)
    base.update(kw)
    return Instance(**base)


ODD_LABELS = sort_labels({"app.kubernetes.io/name": "echo", "team/owner": "payments",
                          "snake_case": "yes", "empty": "", "unicode": "zürich-é",
                          **{f"bulk-{i:02d}": "x" * 250 for i in range(70)}})
"""Keys Consul meta cannot take as they are, and more pairs than it allows."""


def fields(inst: Instance | None) -> tuple[Any, ...] | None:
    """What a registry must keep of an instance across a restart or a replica."""
    if inst is None:
        return None
    return (inst.service, inst.instance_id, inst.spiffe_id, inst.inbound, inst.outbound,
            inst.admin, inst.labels, inst.health, inst.registered_at)


@dataclass
class StandIn:
    """A Consul stand-in process (``url``: consul://HOST:PORT; requires ``token``)."""

    proc: procs.Proc
    url: str
    token: str
    log_dir: Path

    @classmethod
    def start(cls, log_dir: Path, port: int = 0, token: str = TOKEN) -> StandIn:
        proc = procs.start([sys.executable, "-m", "tests.support.consul_standin",
                            "--listen", f"127.0.0.1:{port}", "--acl-token", token],
                           cwd=REPO_ROOT, log_dir=log_dir, ready_timeout_s=20)
        return cls(proc, f"consul://{proc.ready}", token, log_dir)


@dataclass
class Backend:
    """One backend under test: ``open`` makes a started registry on the backend's shared
    state (the same SQLite file, or the same Consul and prefix); all are closed at teardown."""

    id: str
    data_dir: Path
    consul_url: str = ""
    consul_env: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    opened: list[Registry] = field(default_factory=list)

    @property
    def is_consul(self) -> bool:
        return bool(self.consul_url)

    async def open(self, replica: str = "a", **options: Any) -> Registry:
        reg: Registry
        if self.is_consul:
            opts: dict[str, Any] = dict(prefix=self.prefix, ttl_s=TTL_S, watch_wait_s=WAIT_S,
                                        max_backoff_s=0.3, initial_sync_s=10.0,
                                        close_timeout_s=5.0)
            opts.update(options)
            reg = ConsulRegistry.from_url(self.consul_url, GRACE_S, replica_id=replica,
                                          env=self.consul_env, **opts)
        else:
            reg = EmbeddedRegistry.load(Store(self.data_dir), GRACE_S, time.time())
        self.opened.append(reg)
        await reg.start()
        return reg

    async def close(self, reg: Registry) -> None:
        await reg.close()
        if reg in self.opened:
            self.opened.remove(reg)

    def client(self) -> consul.Consul:
        """A py-consul client on the backend's Consul, with its token."""
        return connect(target_from_env(self.consul_url, self.consul_env))

    def consul_entries(self, service: str) -> dict[str, dict[str, Any]]:
        """instance id -> the /v1/health/service entry of that mesh instance of this prefix."""
        _, entries = self.client().health.service(service, tag="mesh")
        return {e["Service"]["Meta"]["mesh_instance_id"]: e for e in entries
                if (e["Service"].get("Meta") or {}).get("mesh_prefix") == self.prefix}

    def check_status(self, service: str, iid: str) -> str | None:
        entry = self.consul_entries(service).get(iid)
        if entry is None:
            return None
        cid = check_id(service_id(self.prefix, service, iid))
        return next(c["Status"] for c in entry["Checks"] if c["CheckID"] == cid)

    def cleanup(self) -> None:
        """Deregister every service this test's prefix left in Consul."""
        c = self.client()
        for sid, svc in c.agent.services().items():
            if (svc.get("Meta") or {}).get("mesh_prefix") == self.prefix:
                c.agent.service.deregister(sid)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    s = StandIn.start(tmp_path_factory.mktemp("consul-standin"))
    yield s
    s.proc.stop()


def _live_url() -> str:
    addr = os.environ.get("CONSUL_HTTP_ADDR", "")
    if not addr:
        pytest.skip(LIVE_SKIP)
    return url_from_http_addr(addr)


async def _backend(kind: str, request: pytest.FixtureRequest,
                   tmp_path: Path) -> AsyncIterator[Backend]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if kind == "embedded":
        b = Backend(kind, tmp_path / "data")
    elif kind == "consul_standin":
        s: StandIn = request.getfixturevalue("standin")
        b = Backend(kind, tmp_path / "data", s.url, {"CONSUL_HTTP_TOKEN": s.token}, prefix)
    else:
        b = Backend(kind, tmp_path / "data", _live_url(), dict(os.environ), prefix)
    yield b
    for reg in list(b.opened):
        await reg.close()
    if b.is_consul:
        b.cleanup()


@pytest.fixture(params=["embedded", "consul_standin", "consul_live"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for b in _backend(request.param, request, tmp_path):
        yield b


@pytest.fixture(params=["consul_standin", "consul_live"])
async def consul_backend(request: pytest.FixtureRequest,
                         tmp_path: Path) -> AsyncIterator[Backend]:
    async for b in _backend(request.param, request, tmp_path):
        yield b


class Counter:
    """A subscriber that counts its calls and the threads it was called on."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[int] = set()

    def __call__(self) -> None:
        self.calls += 1
        self.threads.add(threading.get_ident())


# -- the contract, every backend ---------------------------------------------------------------


async def test_register_stores_the_instance_connected_at_now(backend: Backend) -> None:
    reg = await backend.open()
    now = time.time()
    stored = reg.register(sample(connected=False, disconnected_at=5.0, registered_at=1.0), now)
    assert stored == sample(registered_at=now)
    assert stored.connected and stored.disconnected_at is None
    assert reg.get("echo", "echo-1") == stored
    assert reg.instances() == [stored]


async def test_instances_are_sorted_by_service_then_instance_id(backend: Backend) -> None:
    reg = await backend.open()
    now = time.time()
    for service, iid in [("web", "w-2"), ("echo", "echo-2"), ("web", "w-1"), ("echo", "echo-1")]:
        reg.register(sample(service, iid), now)
    assert [i.key for i in reg.instances()] == [
        ("echo", "echo-1"), ("echo", "echo-2"), ("web", "w-1"), ("web", "w-2")]


async def test_register_again_replaces_the_instance_and_reconnects_it(backend: Backend) -> None:
    reg = await backend.open()
    t0 = time.time()
    reg.register(sample(), t0)
    assert reg.disconnected("echo", "echo-1", t0 + 1)
    again = sample(inbound="127.0.0.1:8001", labels=sort_labels({"version": "v2"}),
                   health=NOT_SERVING, outbound="")
    stored = reg.register(again, t0 + 2)
    assert stored == replace(again, registered_at=t0 + 2)
    assert reg.get("echo", "echo-1") == stored and len(reg.instances()) == 1


async def test_unknown_instances_change_nothing(backend: Backend) -> None:
    reg = await backend.open()
    heard = Counter()
    reg.subscribe(heard)
    now = time.time()
    assert reg.get("echo", "nope") is None
    assert reg.set_health("echo", "nope", SERVING, now) is False
    assert reg.disconnected("echo", "nope", now) is False
    assert reg.prune(now + 3600) == []
    assert reg.instances() == [] and heard.calls == 0


async def test_health_is_validated_and_only_a_change_counts(backend: Backend) -> None:
    reg = await backend.open()
    now = time.time()
    with pytest.raises(ValueError, match="health"):
        reg.register(sample(health="GREAT"), now)
    assert reg.instances() == []
    reg.register(sample(health=SERVING), now)
    with pytest.raises(ValueError, match="health"):
        reg.set_health("echo", "echo-1", "GREAT", now)
    assert reg.set_health("echo", "echo-1", SERVING, now) is False
    assert reg.set_health("echo", "echo-1", NOT_SERVING, now) is True
    assert reg.get("echo", "echo-1").health == NOT_SERVING  # type: ignore[union-attr]
    assert reg.set_health("echo", "echo-1", UNKNOWN, now) is True


async def test_disconnected_starts_the_grace_period_and_prune_ends_it(backend: Backend) -> None:
    reg = await backend.open()
    t0 = time.time()
    reg.register(sample(), t0)
    reg.register(sample(iid="echo-2"), t0)
    assert reg.disconnected("echo", "echo-1", t0 + 1) is True
    assert reg.disconnected("echo", "echo-1", t0 + 2) is False   # already
    gone = reg.get("echo", "echo-1")
    assert gone is not None and not gone.connected and gone.disconnected_at == t0 + 1
    assert gone.health == SERVING   # kept, with its last health, until pruned
    assert reg.prune(t0 + 1 + GRACE_S * 0.5) == []
    assert reg.prune(t0 + 1 + GRACE_S + 0.01) == [gone]
    assert reg.get("echo", "echo-1") is None
    assert [i.instance_id for i in reg.instances()] == ["echo-2"]


async def test_subscribers_hear_each_change_on_the_loop_and_can_leave(backend: Backend) -> None:
    reg = await backend.open()
    heard = Counter()
    leave = reg.subscribe(heard)
    now = time.time()
    reg.register(sample(), now)
    assert heard.calls == 1
    reg.set_health("echo", "echo-1", NOT_SERVING, now)
    assert heard.calls == 2
    reg.set_health("echo", "echo-1", NOT_SERVING, now)   # no change: no call
    assert heard.calls == 2
    reg.disconnected("echo", "echo-1", now)
    assert heard.calls == 3
    reg.prune(now + GRACE_S + 1)
    assert heard.calls == 4
    assert heard.threads == {threading.get_ident()}
    leave()
    reg.register(sample(), now)
    assert heard.calls == 4


async def test_labels_round_trip(backend: Backend) -> None:
    reg = await backend.open()
    stored = reg.register(sample(labels=ODD_LABELS), time.time())
    assert stored.labels == ODD_LABELS
    assert reg.get("echo", "echo-1").labels == ODD_LABELS  # type: ignore[union-attr]


async def test_a_new_registry_on_the_same_store_sees_the_instances(backend: Backend) -> None:
    first = await backend.open()
    t0 = time.time()
    kept = [first.register(sample(labels=ODD_LABELS, health=NOT_SERVING), t0),
            first.register(sample(iid="echo-2", inbound="", admin="", health=""), t0),
            first.register(sample("web", "w-1"), t0)]
    first.disconnected("web", "w-1", t0 + 0.5)
    await backend.close(first)   # a restart: the same store, the same replica

    restart = time.time()
    second = await backend.open()
    await eventually(lambda: len(second.instances()) == 3, what="the restored instances")
    assert [fields(i) for i in second.instances()] == [fields(i) for i in kept]
    # Their streams are gone, and the grace period runs from the restart.
    assert not any(i.connected for i in second.instances())
    assert all(i.disconnected_at >= restart for i in second.instances())  # type: ignore[operator]
    assert second.prune(restart + GRACE_S * 0.9) == []
    assert {i.key for i in second.prune(time.time() + GRACE_S + 1)} == {i.key for i in kept}
    await backend.close(second)

    third = await backend.open()
    await asyncio.sleep(0.5 if backend.is_consul else 0)   # a watch round, were any left
    assert third.instances() == []


# -- Consul only: what Consul holds, replicas, TTLs, outages -------------------------------------


async def test_an_instance_is_an_agent_service_with_meta_and_a_ttl_check_kept_passing(
        consul_backend: Backend) -> None:
    b = consul_backend
    reg = await b.open()
    assert isinstance(reg, ConsulRegistry)
    now = time.time()
    reg.register(sample(labels=sort_labels({"app.kubernetes.io/name": "echo"})), now)
    reg.register(sample(iid="echo-out", inbound="", admin=""), now)
    assert await reg.flush()
    entries = b.consul_entries("echo")
    svc = entries["echo-1"]["Service"]
    assert svc["ID"] == service_id(b.prefix, "echo", "echo-1") == reg.service_id("echo", "echo-1")
    assert (svc["Service"], svc["Address"], svc["Port"], svc["Tags"]) == \
        ("echo", "127.0.0.1", 7001, ["mesh"])
    assert svc["Meta"]["label_app_dkubernetes_dio_sname"] == "echo"
    assert svc["Meta"]["mesh_replica"] == "a" and svc["Meta"]["mesh_health"] == SERVING
    assert entries["echo-out"]["Service"]["Port"] == 0   # outbound-only: no port, still there
    assert b.check_status("echo", "echo-1") == "passing"
    await asyncio.sleep(TTL_S * 2.5)   # well past the TTL: it is kept passing
    assert b.check_status("echo", "echo-1") == "passing"
    assert b.check_status("echo", "echo-out") == "passing"

    reg.set_health("echo", "echo-1", NOT_SERVING, time.time())   # the app's health: Meta
    await eventually(lambda: b.consul_entries("echo")["echo-1"]["Service"]["Meta"]
                     ["mesh_health"] == NOT_SERVING, what="the new health in Consul")
    assert b.check_status("echo", "echo-1") == "passing"
    reg.disconnected("echo", "echo-1", time.time())   # the stream is gone: the check fails
    await eventually(lambda: b.check_status("echo", "echo-1") == "critical",
                     what="the check failing")
    assert b.consul_entries("echo")["echo-1"]["Service"]["Meta"]["mesh_connected"] == "false"
    reg.prune(time.time() + GRACE_S + 1)   # prune deregisters explicitly
    await eventually(lambda: "echo-1" not in b.consul_entries("echo"), what="deregistration")
    assert "echo-out" in b.consul_entries("echo")


async def test_an_instance_removed_behind_the_registrys_back_is_put_back(
        consul_backend: Backend) -> None:
    b = consul_backend
    reg = await b.open()
    now = time.time()
    reg.register(sample(), now)
    reg.register(sample(iid="echo-2"), now)
    reg.disconnected("echo", "echo-2", now)   # no TTL passes for it: only the watch can tell
    assert await reg.flush()   # type: ignore[attr-defined]
    c = b.client()
    for iid in ("echo-1", "echo-2"):   # an operator's `consul services deregister`
        assert c.agent.service.deregister(service_id(b.prefix, "echo", iid))
    await eventually(lambda: set(b.consul_entries("echo")) == {"echo-1", "echo-2"},
                     what="both instances put back")
    await eventually(lambda: b.check_status("echo", "echo-1") == "passing", what="passing")
    assert b.check_status("echo", "echo-2") == "critical"
    assert b.consul_entries("echo")["echo-2"]["Service"]["Meta"]["mesh_connected"] == "false"
    assert [i.instance_id for i in reg.instances()] == ["echo-1", "echo-2"]


async def test_a_second_replica_sees_the_first_ones_instances_and_changes(
        consul_backend: Backend) -> None:
    b = consul_backend
    one = await b.open("replica-1")
    two = await b.open("replica-2")
    heard = Counter()
    two.subscribe(heard)
    now = time.time()
    x = one.register(sample(labels=ODD_LABELS), now)
    one.register(sample(iid="echo-2", inbound=""), now)
    await eventually(lambda: two.get("echo", "echo-1") == x and two.get("echo", "echo-2"),
                     what="replica 2 seeing replica 1's instances")
    assert heard.calls >= 1 and heard.threads == {threading.get_ident()}   # on the loop
    assert two.set_health("echo", "echo-1", UNKNOWN, time.time()) is False   # not its own
    assert two.disconnected("echo", "echo-1", time.time()) is False

    one.set_health("echo", "echo-1", NOT_SERVING, time.time())
    await eventually(lambda: two.get("echo", "echo-1").health == NOT_SERVING,
                     what="the health change")
    t_off = time.time()
    one.disconnected("echo", "echo-1", t_off)
    await eventually(lambda: not two.get("echo", "echo-1").connected, what="the disconnect")
    assert two.get("echo", "echo-1").disconnected_at == t_off   # type: ignore[union-attr]
    one.prune(t_off + GRACE_S + 1)
    await eventually(lambda: two.get("echo", "echo-1") is None, what="the pruned instance gone")
    assert two.get("echo", "echo-2") is not None and two.get("echo", "echo-2").connected


async def test_ttl_lapses_when_a_replica_stops_without_deregistering(
        consul_backend: Backend) -> None:
    b = consul_backend
    one = await b.open("replica-1")
    two = await b.open("replica-2")
    one.register(sample(), time.time())
    await eventually(lambda: two.get("echo", "echo-1") is not None and
                     two.get("echo", "echo-1").connected, what="replica 2 seeing it")
    await b.close(one)   # as a crash would leave it: registered, its check no longer passed
    assert b.check_status("echo", "echo-1") == "passing"
    seen_down = await eventually(lambda: (lambda i: i is not None and not i.connected and i)(
        two.get("echo", "echo-1")), timeout_s=TTL_S + 10, what="the TTL lapsing")
    assert b.check_status("echo", "echo-1") == "critical"
    assert seen_down.disconnected_at is not None
    assert two.prune(seen_down.disconnected_at + GRACE_S * 0.5) == []
    assert [i.key for i in two.prune(seen_down.disconnected_at + GRACE_S + 0.1)] == \
        [("echo", "echo-1")]
    await eventually(lambda: "echo-1" not in b.consul_entries("echo"),
                     what="the surviving replica deregistering it")


async def test_the_newest_registration_owns_an_instance_that_moved(
        consul_backend: Backend) -> None:
    b = consul_backend
    one = await b.open("replica-1")
    two = await b.open("replica-2")
    assert isinstance(one, ConsulRegistry) and isinstance(two, ConsulRegistry)
    t0 = time.time()
    one.register(sample(), t0)
    await eventually(lambda: two.get("echo", "echo-1") is not None, what="replica 2 seeing it")
    moved = two.register(sample(inbound="127.0.0.1:9001"), t0 + 1)   # its sidecar moved
    await eventually(lambda: one.get("echo", "echo-1") == moved, what="replica 1 yielding")
    assert not one.owned("echo", "echo-1") and two.owned("echo", "echo-1")
    assert one.disconnected("echo", "echo-1", time.time()) is False   # its old stream ends
    await asyncio.sleep(TTL_S * 2)
    entry = b.consul_entries("echo")["echo-1"]
    assert entry["Service"]["Meta"]["mesh_replica"] == "replica-2"
    assert entry["Service"]["Port"] == 9001
    assert b.check_status("echo", "echo-1") == "passing"
    assert one.get("echo", "echo-1").connected   # type: ignore[union-attr]


async def test_consul_unreachable_methods_still_work_and_catch_up_after(
        consul_backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if consul_backend.id == "consul_live":
        pytest.skip("needs to stop and restart Consul: the stand-in only")
    port = procs.free_port()
    s = await asyncio.to_thread(StandIn.start, tmp_path, port)
    b = Backend("consul_standin", tmp_path / "data", s.url, {"CONSUL_HTTP_TOKEN": s.token},
                consul_backend.prefix)
    try:
        reg = await b.open()
        assert isinstance(reg, ConsulRegistry)
        caplog.set_level(logging.INFO, logger="mesh.control_plane.registry.consul")
        now = time.time()
        reg.register(sample(), now)
        assert await reg.flush()
        assert reg.consul_reachable and reg.consul_outages == 0

        await asyncio.to_thread(s.proc.stop)   # Consul goes away, state and all
        await eventually(lambda: not reg.consul_reachable, what="the outage noticed")
        heard = Counter()
        reg.subscribe(heard)
        t1 = time.time()
        y = reg.register(sample(iid="echo-2", health=NOT_SERVING), t1)   # all still works
        assert reg.get("echo", "echo-2") == y
        assert reg.set_health("echo", "echo-1", NOT_SERVING, t1) is True
        assert reg.disconnected("echo", "echo-2", t1) is True
        assert heard.calls == 3
        errors = reg.consul_errors
        await eventually(lambda: reg.consul_errors >= errors + 3, what="retries")
        assert reg.consul_outages == 1
        warnings = [r for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(warnings) == 1   # one line per outage, not per attempt

        s = await asyncio.to_thread(StandIn.start, tmp_path, port)   # back, but empty
        await eventually(lambda: reg.consul_reachable, what="Consul answering again")
        await eventually(lambda: {"echo-1", "echo-2"} <= set(b.consul_entries("echo")),
                         what="both instances written again")
        metas = {k: e["Service"]["Meta"] for k, e in b.consul_entries("echo").items()}
        assert metas["echo-1"]["mesh_health"] == NOT_SERVING
        assert metas["echo-2"]["mesh_connected"] == "false"
        await eventually(lambda: b.check_status("echo", "echo-1") == "passing",
                         what="echo-1's check passing")
        assert b.check_status("echo", "echo-2") == "critical"
        assert reg.consul_outages == 1
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        for reg_ in list(b.opened):
            await reg_.close()
        await asyncio.to_thread(s.proc.stop)


# -- the control plane with --registry consul://, a real sidecar ---------------------------------


def _start_cp(base: Path, name: str, url: str, prefix: str) -> ControlPlaneProc:
    ca_dir, data_dir = base / name / "ca", base / name / "data"
    proc = procs.start([sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
                        "--bootstrap-listen", "127.0.0.1:0", "--ca-dir", str(ca_dir),
                        "--data-dir", str(data_dir), "--admin-http", "127.0.0.1:0",
                        "--otlp-listen", "", "--grace-period-s", str(GRACE_S),
                        "--registry", url, "--consul-prefix", prefix],
                       env={"CONSUL_HTTP_TOKEN": TOKEN}, cwd=REPO_ROOT, log_dir=base)
    return ControlPlaneProc(proc, ca_dir, data_dir)


def _sidecars(cp: ControlPlaneProc) -> dict[str, pb.SidecarStatus]:
    with admin_channel(cp) as ch:
        resp = pb_grpc.AdminStub(ch).ListSidecars(pb.ListSidecarsRequest(), timeout=5)
    return {s.instance: s for s in resp.sidecars}


@pytest.mark.timeout(120)
def test_control_plane_on_consul_registers_a_joining_sidecar(standin: StandIn,
                                                             tmp_path: Path) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    b = Backend("consul_standin", tmp_path / "unused", standin.url,
                {"CONSUL_HTTP_TOKEN": standin.token}, prefix)
    started: list[procs.Proc] = []
    try:
        cp = _start_cp(tmp_path, "cp1", standin.url, prefix)
        started.append(cp.proc)
        app = procs.start([sys.executable, "-m", "tests.support.echo_server", "--port", "0",
                           "--server-id", "echo-1"], cwd=REPO_ROOT, log_dir=tmp_path)
        started.append(app)
        sc = procs.start(sidecar_cmd("--service", "echo", "--instance-id", "echo-1",
                                     "--token", create_token(cp, "echo"),
                                     "--app", f"127.0.0.1:{app.ready['port']}",
                                     "--label", "version=v1", "--health-interval-s", "0.3"),
                         cwd=REPO_ROOT, log_dir=tmp_path)
        started.append(sc)
        inbound_port = int(str(sc.ready["inbound"]).rpartition(":")[2])

        def registered() -> dict[str, Any] | None:
            e = b.consul_entries("echo").get("echo-1")
            ok = e and b.check_status("echo", "echo-1") == "passing" and \
                e["Service"]["Meta"].get("mesh_health") == SERVING
            return e if ok else None

        entry = procs.wait_for(registered, 20, what="the sidecar in Consul's catalog")
        svc = entry["Service"]
        assert svc["Port"] == inbound_port and svc["Tags"] == ["mesh"]
        assert svc["Meta"]["label_version"] == "v1"
        assert svc["Meta"]["mesh_spiffe_id"] == f"spiffe://{TD}/service/echo"
        assert svc["ID"] == service_id(prefix, "echo", "echo-1")

        mine = procs.wait_for(lambda: _sidecars(cp).get("echo-1"), 10, what="ListSidecars")
        assert mine.connected and mine.inbound.endswith(f":{inbound_port}")
        r = meshctl(cp, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert '"instance": "echo-1"' in r.stdout

        # A second replica on the same Consul (another data dir) knows the instance too.
        cp2 = _start_cp(tmp_path, "cp2", standin.url, prefix)
        started.append(cp2.proc)
        other = procs.wait_for(lambda: _sidecars(cp2).get("echo-1"), 15,
                               what="the second replica's ListSidecars")
        assert other.connected and other.labels["version"] == "v1"

        sc.stop()   # the stream ends: its control plane fails the check at once
        procs.wait_for(lambda: b.check_status("echo", "echo-1") == "critical", 10,
                       what="the check failing")
        procs.wait_for(lambda: not _sidecars(cp2)["echo-1"].connected, 10,
                       what="the second replica seeing it disconnected")
        for c in (cp2, cp):   # both stop cleanly, their writes flushed
            assert c.proc.stop(timeout_s=15) == 0, c.proc.log_tail()
            assert "Traceback" not in c.proc.log_text(), c.proc.log_tail()
    finally:
        for p in reversed(started):
            p.stop(timeout_s=10)
        b.cleanup()
