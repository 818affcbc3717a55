"""The Consul stand-in (tests/support/consul_standin.py), driven as a process by the real
py-consul client, as the mesh's Consul registry backend will drive it.

Each test states one documented Consul behaviour the backend relies on. Timers are short
(TTL 1 s, DeregisterCriticalServiceAfter 1 s, lock-delay 2 s); a session's TTL cannot go
below Consul's 10 s minimum, so one test spends that long waiting for a session to expire.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest
import requests

from tests.support import procs

pytestmark = pytest.mark.timeout(60)

StandIn = tuple[procs.Proc, str, int]


def _start(tmp: Path, *extra: str) -> StandIn:
    proc = procs.start(
        [sys.executable, "-m", "tests.support.consul_standin", "--listen", "127.0.0.1:0", *extra],
        log_dir=tmp,
        ready_timeout_s=20,
    )
    host, port = procs.hostport(proc.ready)
    return proc, host, port


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul prefers CONSUL_HTTP_TOKEN over the token it is given: keep it out."""
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    started = _start(tmp_path_factory.mktemp("consul-standin"))
    yield started
    started[0].stop()


@pytest.fixture
def client(standin: StandIn) -> consul.Consul:
    _, host, port = standin
    return consul.Consul(host=host, port=port)


@pytest.fixture
def url(standin: StandIn) -> Callable[[str], str]:
    _, host, port = standin
    return lambda path: f"http://{host}:{port}{path}"


def _parked(url: Callable[[str], str], path: str, index: int) -> bool:
    """True once the stand-in holds a blocking query on `path` with `index`."""
    stats = requests.get(url("/_standin/stats"), timeout=5).json()
    return any(b["path"] == path and b["index"] == index for b in stats["blocked"])


class _InThread:
    """Run `fn` in a thread; `.result(timeout)` returns its value (or raises its error) and
    `.elapsed_s` how long it took."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self.elapsed_s = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to result()
            self._error = e
        self.elapsed_s = time.monotonic() - t0

    def result(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"still running after {timeout_s}s"
        if self._error is not None:
            raise self._error
        return self._value


# -- node, status, index basics ------------------------------------------------------------


def test_self_status_and_nodes_describe_one_leader_node(client: consul.Consul, url: Callable[[str], str]) -> None:
    cfg = client.agent.self()["Config"]
    assert cfg["Datacenter"] == "dc1" and cfg["NodeName"] == "consul-standin"
    assert client.status.leader() == "127.0.0.1:8300"
    assert client.status.peers() == ["127.0.0.1:8300"]
    index, nodes = client.catalog.nodes()
    assert int(index) >= 1
    assert [n["Node"] for n in nodes] == ["consul-standin"]
    assert {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta", "CreateIndex", "ModifyIndex"} <= set(nodes[0])
    # A missing key is a 404 that still carries the query meta, and the index is never 0.
    r = requests.get(url("/v1/kv/basics/never-written"), timeout=5)
    assert r.status_code == 404
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert r.headers["X-Consul-KnownLeader"] == "true" and r.headers["X-Consul-LastContact"] == "0"
    # Agent endpoints do not block and carry no index, as in Consul.
    r = requests.get(url("/v1/agent/services"), timeout=5)
    assert r.status_code == 200 and "X-Consul-Index" not in r.headers


# -- agent, catalog and health -------------------------------------------------------------


def test_registered_ttl_service_is_critical_until_passed_then_healthy_in_catalog_and_health(
    client: consul.Consul,
) -> None:
    ok = client.agent.service.register(
        "orders", service_id="orders-1", address="127.0.0.2", port=7001, tags=["v1", "blue"],
        meta={"version": "1.2", "zone": "a"}, check=consul.Check.ttl("30s"),
    )
    assert ok is True
    checks = client.agent.checks()
    assert checks["service:orders-1"]["Status"] == "critical"  # Consul's initial status
    assert checks["service:orders-1"]["Name"] == "Service 'orders' check"
    assert checks["service:orders-1"]["ServiceID"] == "orders-1"
    _, passing = client.health.service("orders", passing=True)
    assert passing == []

    assert client.agent.check.ttl_pass("service:orders-1", notes="ready") is True
    _, passing = client.health.service("orders", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["orders-1"]
    entry = passing[0]
    assert set(entry) == {"Node", "Service", "Checks"}
    assert entry["Node"]["Node"] == "consul-standin" and entry["Node"]["Address"] == "127.0.0.1"
    svc = entry["Service"]
    assert (svc["Service"], svc["Address"], svc["Port"]) == ("orders", "127.0.0.2", 7001)
    assert svc["Tags"] == ["v1", "blue"] and svc["Meta"] == {"version": "1.2", "zone": "a"}
    assert {c["CheckID"]: c["Status"] for c in entry["Checks"]} == {"serfHealth": "passing", "service:orders-1": "passing"}
    assert next(c for c in entry["Checks"] if c["CheckID"] == "service:orders-1")["Output"] == "ready"

    _, catalog = client.catalog.service("orders")
    assert len(catalog) == 1
    row = catalog[0]
    assert (row["Node"], row["Address"], row["ServiceID"], row["ServiceName"]) == (
        "consul-standin", "127.0.0.1", "orders-1", "orders",
    )
    assert (row["ServiceAddress"], row["ServicePort"]) == ("127.0.0.2", 7001)
    assert row["ServiceMeta"] == {"version": "1.2", "zone": "a"} and row["ServiceTags"] == ["v1", "blue"]
    assert 1 <= row["CreateIndex"] <= row["ModifyIndex"]
    _, by_tag = client.catalog.service("orders", tag="blue")
    assert len(by_tag) == 1
    _, no_tag = client.catalog.service("orders", tag="green")
    assert no_tag == []

    _, services = client.catalog.services()
    assert services["consul"] == [] and sorted(services["orders"]) == ["blue", "v1"]
    agent_svc = client.agent.services()["orders-1"]
    assert (agent_svc["Service"], agent_svc["Port"], agent_svc["Meta"]["zone"]) == ("orders", 7001, "a")
    _, hchecks = client.health.checks("orders")
    assert [(c["CheckID"], c["Status"], c["ServiceName"]) for c in hchecks] == [("service:orders-1", "passing", "orders")]

    assert client.agent.check.ttl_warn("service:orders-1", notes="slow") is True
    _, passing = client.health.service("orders", passing=True)
    assert passing == []  # ?passing excludes warning, as documented
    _, all_entries = client.health.service("orders")
    assert len(all_entries) == 1

    assert client.agent.service.deregister("orders-1") is True
    assert "orders-1" not in client.agent.services()
    assert "service:orders-1" not in client.agent.checks()
    assert client.catalog.service("orders")[1] == []
    assert "orders" not in client.catalog.services()[1]


def test_several_checks_get_numbered_ids_and_reregistering_keeps_their_status(client: consul.Consul) -> None:
    checks = [consul.Check.ttl("30s"), consul.Check.ttl("30s")]
    client.agent.service.register("multi", service_id="multi-1", port=1, check=checks[0], extra_checks=checks[1:])
    ids = sorted(c for c in client.agent.checks() if c.startswith("service:multi-1"))
    assert ids == ["service:multi-1:1", "service:multi-1:2"]
    client.agent.check.ttl_pass("service:multi-1:1")
    client.agent.service.register("multi", service_id="multi-1", port=2, check=checks[0], extra_checks=checks[1:])
    after = client.agent.checks()
    assert after["service:multi-1:1"]["Status"] == "passing"  # kept across re-registration
    assert after["service:multi-1:2"]["Status"] == "critical"
    assert client.agent.services()["multi-1"]["Port"] == 2
    client.agent.service.deregister("multi-1")


def test_ttl_expiry_turns_check_critical_and_service_is_deregistered_after_the_grace(
    client: consul.Consul,
) -> None:
    ttl_check = {"ttl": "1s", "DeregisterCriticalServiceAfter": "1s"}
    client.agent.service.register("reaped", service_id="reaped-1", port=1, check=ttl_check)
    client.agent.service.register("reaped", service_id="reaped-2", port=2, check=ttl_check)
    client.agent.check.ttl_pass("service:reaped-1")
    client.agent.check.ttl_pass("service:reaped-2")
    t_pass = time.monotonic()

    def critical_while_keeping_2_alive() -> bool:
        client.agent.check.ttl_pass("service:reaped-2")
        return client.agent.checks()["service:reaped-1"]["Status"] == "critical"

    procs.wait_for(critical_while_keeping_2_alive, timeout_s=5, interval_s=0.1, what="TTL expiry")
    t_critical = time.monotonic()
    assert t_critical - t_pass >= 0.9
    assert client.agent.checks()["service:reaped-1"]["Output"].startswith("TTL expired")

    def gone_while_keeping_2_alive() -> bool:
        client.agent.check.ttl_pass("service:reaped-2")
        return "reaped-1" not in client.agent.services()

    procs.wait_for(gone_while_keeping_2_alive, timeout_s=5, interval_s=0.1, what="reaping")
    assert time.monotonic() - t_critical >= 0.9
    assert [e["ServiceID"] for e in client.catalog.service("reaped")[1]] == ["reaped-2"]
    assert "service:reaped-1" not in client.agent.checks()
    client.agent.service.deregister("reaped-2")


# -- blocking queries ----------------------------------------------------------------------


def test_blocking_health_query_waits_for_wait_then_returns_promptly_on_change(
    client: consul.Consul, url: Callable[[str], str]
) -> None:
    client.agent.service.register("watched", service_id="watched-1", port=1, check=consul.Check.ttl("60s"))
    index, _ = client.health.service("watched")

    t0 = time.monotonic()
    same_index, _ = client.health.service("watched", index=index, wait="1s")
    elapsed = time.monotonic() - t0
    assert same_index == index
    assert 0.9 <= elapsed < 3.0

    waiter = _InThread(lambda: client.health.service("watched", index=index, wait="20s"))
    procs.wait_for(lambda: _parked(url, "/v1/health/service/watched", int(index)), timeout_s=5, what="parked query")
    t_change = time.monotonic()
    client.agent.check.ttl_pass("service:watched-1")
    new_index, entries = waiter.result(timeout_s=10)
    assert time.monotonic() - t_change < 2.0
    assert int(new_index) > int(index)
    assert entries[0]["Checks"][-1]["Status"] == "passing"

    # An index ahead of the state (e.g. the server lost its data) answers at once with a
    # lower index, so the client resets (blocking-queries page, "reset the index").
    t0 = time.monotonic()
    answer_index, _ = client.health.service("watched", index=int(new_index) + 1000, wait="10s")
    assert time.monotonic() - t0 < 2.0
    assert int(answer_index) < int(new_index) + 1000
    client.agent.service.deregister("watched-1")


def test_blocking_kv_query_wakes_on_its_key_and_not_on_others(
    client: consul.Consul, url: Callable[[str], str]
) -> None:
    client.kv.put("watch/a", "1")
    index, _ = client.kv.get("watch/a")

    waiter = _InThread(lambda: client.kv.get("watch/a", index=index, wait="1s"))
    procs.wait_for(lambda: _parked(url, "/v1/kv/watch/a", int(index)), timeout_s=5, what="parked kv query")
    client.kv.put("watch/other", "x")
    same_index, _ = waiter.result(timeout_s=10)
    assert same_index == index and waiter.elapsed_s >= 0.9

    waiter = _InThread(lambda: client.kv.get("watch/a", index=index, wait="20s"))
    procs.wait_for(lambda: _parked(url, "/v1/kv/watch/a", int(index)), timeout_s=5, what="parked kv query")
    client.kv.put("watch/a", "2")
    new_index, entry = waiter.result(timeout_s=10)
    assert waiter.elapsed_s < 5 and int(new_index) > int(index) and entry["Value"] == b"2"
    assert int(new_index) == entry["ModifyIndex"]


# -- KV ------------------------------------------------------------------------------------


def test_kv_put_get_recurse_keys_raw_and_delete(client: consul.Consul, url: Callable[[str], str]) -> None:
    assert client.kv.put("app/cfg/db", "postgres://x", flags=42) is True
    assert client.kv.put("app/cfg/cache", b"\x00\xffbin") is True
    assert client.kv.put("app/tokens/t1", "h1") is True
    assert client.kv.put("app/empty", None) is True

    _, one = client.kv.get("app/cfg/db")
    assert one["Value"] == b"postgres://x" and one["Flags"] == 42 and one["LockIndex"] == 0
    assert one["CreateIndex"] == one["ModifyIndex"] >= 1 and "Session" not in one
    raw = requests.get(url("/v1/kv/app/cfg/db"), timeout=5).json()
    assert raw[0]["Value"] == base64.b64encode(b"postgres://x").decode()  # base64 in the JSON
    assert requests.get(url("/v1/kv/app/cfg/cache?raw"), timeout=5).content == b"\x00\xffbin"
    assert client.kv.get("app/empty")[1]["Value"] is None

    _, tree = client.kv.get("app/cfg", recurse=True)
    assert [e["Key"] for e in tree] == ["app/cfg/cache", "app/cfg/db"]
    _, keys = client.kv.get("app/", keys=True)
    assert keys == ["app/cfg/cache", "app/cfg/db", "app/empty", "app/tokens/t1"]
    _, top = client.kv.get("app/", keys=True, separator="/")
    assert top == ["app/cfg/", "app/empty", "app/tokens/"]
    assert client.kv.get("app/nothing-here", keys=True)[1] is None  # 404
    assert client.kv.get("app/missing")[1] is None

    _, before = client.kv.get("app/cfg/db")
    assert client.kv.delete("app/cfg/db", cas=before["ModifyIndex"] + 1) is False
    assert client.kv.get("app/cfg/db")[1] is not None
    assert client.kv.delete("app/cfg/db", cas=before["ModifyIndex"]) is True
    assert client.kv.get("app/cfg/db")[1] is None
    assert client.kv.delete("app/", recurse=True) is True
    assert client.kv.get("app/", recurse=True)[1] is None


def test_cas_create_by_two_concurrent_writers_lets_exactly_one_win(standin: StandIn) -> None:
    _, host, port = standin
    writers = [consul.Consul(host=host, port=port) for _ in range(2)]
    for n in range(15):
        key = f"race/{n}"
        barrier = threading.Barrier(2)

        def write(c: consul.Consul, who: str, key: str = key, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait(timeout=5)
            return c.kv.put(key, who, cas=0)

        racers = [_InThread(lambda c=c, who=f"w{i}": write(c, who)) for i, c in enumerate(writers)]
        wins = [r.result(timeout_s=10) for r in racers]
        assert sorted(wins) == [False, True], (key, wins)
        winner = f"w{wins.index(True)}"
        assert writers[0].kv.get(key)[1]["Value"] == winner.encode()


def test_cas_update_with_a_stale_index_fails_and_changes_nothing(client: consul.Consul) -> None:
    assert client.kv.put("cas/doc", "v1", cas=0) is True
    assert client.kv.put("cas/doc", "again", cas=0) is False  # cas=0: create only
    _, e1 = client.kv.get("cas/doc")
    assert client.kv.put("cas/doc", "v2", cas=e1["ModifyIndex"]) is True
    assert client.kv.put("cas/doc", "v3-stale", cas=e1["ModifyIndex"]) is False
    _, e2 = client.kv.get("cas/doc")
    assert e2["Value"] == b"v2" and e2["ModifyIndex"] > e1["ModifyIndex"] and e2["CreateIndex"] == e1["CreateIndex"]


def test_txn_applies_all_operations_at_one_index_or_none(client: consul.Consul, url: Callable[[str], str]) -> None:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    ok = client.txn.put([
        {"KV": {"Verb": "set", "Key": "txn/a", "Value": b64("A")}},
        {"KV": {"Verb": "cas", "Key": "txn/b", "Value": b64("B"), "Index": 0}},
    ])
    assert ok["Errors"] is None and [r["KV"]["Key"] for r in ok["Results"]] == ["txn/a", "txn/b"]
    assert ok["Results"][0]["KV"]["ModifyIndex"] == ok["Results"][1]["KV"]["ModifyIndex"]
    failing = [
        {"KV": {"Verb": "set", "Key": "txn/c", "Value": b64("C")}},
        {"KV": {"Verb": "check-not-exists", "Key": "txn/a"}},
    ]
    r = requests.put(url("/v1/txn"), data=json.dumps(failing), timeout=5)
    assert r.status_code == 409
    assert r.json()["Errors"][0]["OpIndex"] == 1
    assert client.kv.get("txn/c")[1] is None


# -- sessions and locks --------------------------------------------------------------------


def test_session_lock_is_exclusive_until_released(client: consul.Consul) -> None:
    s1 = client.session.create(name="leader-a", ttl=30, lock_delay=0)
    s2 = client.session.create(name="leader-b", ttl=30, lock_delay=0)
    assert client.kv.put("locks/leader", "a", acquire=s1) is True
    assert client.kv.put("locks/leader", "b", acquire=s2) is False
    _, held = client.kv.get("locks/leader")
    assert held["Session"] == s1 and held["LockIndex"] == 1 and held["Value"] == b"a"
    assert client.kv.put("locks/leader", "a2", acquire=s1) is True  # re-acquire by the holder
    assert client.kv.get("locks/leader")[1]["LockIndex"] == 1
    assert client.kv.put("locks/leader", "b", release=s2) is False  # not the holder
    assert client.kv.put("locks/leader", "a", release=s1) is True
    assert "Session" not in client.kv.get("locks/leader")[1]
    assert client.kv.put("locks/leader", "b", acquire=s2) is True
    assert client.kv.get("locks/leader")[1]["LockIndex"] == 2
    with pytest.raises(consul.ConsulException, match="invalid session"):
        client.kv.put("locks/other", "x", acquire="00000000-0000-0000-0000-000000000000")
    info = client.session.info(s1)[1]
    assert (info["Name"], info["Behavior"], info["TTL"], info["LockDelay"]) == ("leader-a", "release", "30s", 0)
    assert {s["ID"] for s in client.session.list()[1]} >= {s1, s2}
    assert client.session.destroy(s1) is True and client.session.destroy(s2) is True
    assert client.session.info(s1)[1] is None
    assert "Session" not in client.kv.get("locks/leader")[1]


def test_session_bound_to_a_ttl_check_is_invalidated_when_the_check_fails(client: consul.Consul) -> None:
    client.agent.service.register("cp", service_id="cp-1", port=1, check=consul.Check.ttl("60s"))
    with pytest.raises(consul.ConsulException, match="critical"):
        client.session.create(checks=["serfHealth", "service:cp-1"])
    client.agent.check.ttl_pass("service:cp-1")
    sid = client.session.create(checks=["serfHealth", "service:cp-1"], lock_delay=0)
    assert client.kv.put("locks/cp", "me", acquire=sid) is True
    client.agent.check.ttl_fail("service:cp-1", notes="going away")
    assert client.session.info(sid)[1] is None
    assert "Session" not in client.kv.get("locks/cp")[1]
    client.agent.service.deregister("cp-1")


@pytest.mark.slow  # Consul's shortest session TTL is 10 s
def test_session_ttl_expiry_releases_the_lock_and_lock_delay_holds_it(client: consul.Consul) -> None:
    expiring = client.session.create(name="expiring", ttl=10, lock_delay=2)
    ephemeral = client.session.create(name="ephemeral", ttl=10, lock_delay=2, behavior="delete")
    renewed = client.session.create(name="renewed", ttl=10, lock_delay=0)
    other = client.session.create(name="other", ttl=60, lock_delay=0)
    assert client.kv.put("locks/expiring", "x", acquire=expiring) is True
    assert client.kv.put("locks/ephemeral", "y", acquire=ephemeral) is True
    assert client.kv.put("locks/renewed", "z", acquire=renewed) is True
    t_created = time.monotonic()

    def released() -> bool:
        client.session.renew(renewed)
        return "Session" not in client.kv.get("locks/expiring")[1]

    procs.wait_for(released, timeout_s=15, interval_s=0.1, what="session TTL expiry")
    t_released = time.monotonic()
    assert t_released - t_created >= 9.5  # not before the TTL
    assert client.session.info(expiring)[1] is None
    with pytest.raises(consul.NotFound):
        client.session.renew(expiring)
    assert client.kv.get("locks/ephemeral")[1] is None  # Behavior=delete removed the key
    assert client.kv.get("locks/renewed")[1]["Session"] == renewed  # renewals kept it alive

    assert client.kv.put("locks/expiring", "mine", acquire=other) is False  # lock-delay
    procs.wait_for(
        lambda: client.kv.put("locks/expiring", "mine", acquire=other), timeout_s=5, interval_s=0.1, what="lock-delay end"
    )
    assert time.monotonic() - t_released >= 1.5
    assert client.kv.get("locks/expiring")[1]["Session"] == other
    for sid in (renewed, other):
        client.session.destroy(sid)


# -- errors, ACL, persistence --------------------------------------------------------------


def test_bad_requests_get_consul_status_codes_with_text_bodies(
    client: consul.Consul, url: Callable[[str], str]
) -> None:
    def put(path: str, body: bytes | str = b"") -> requests.Response:
        return requests.put(url(path), data=body, timeout=5)

    r = put("/v1/agent/service/register", b"{not json")
    assert r.status_code == 400 and r.text.startswith("Request decode failed")
    assert put("/v1/agent/service/register", json.dumps({"Port": 1})).status_code == 400  # no name
    http_check = {"Name": "h", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "10s"}}
    assert put("/v1/agent/service/register", json.dumps(http_check)).status_code == 400
    assert put("/v1/agent/check/pass/no-such-check").status_code == 404
    assert put("/v1/agent/service/deregister/no-such-service").status_code == 404
    r = requests.get(url("/v1/agent/service/register"), timeout=5)
    assert r.status_code == 405
    assert requests.get(url("/v1/no/such/endpoint"), timeout=5).status_code == 404
    assert requests.get(url("/v1/kv/x?index=1&wait=soon"), timeout=5).status_code == 400
    assert requests.get(url("/v1/kv/x?index=abc"), timeout=5).status_code == 400
    assert requests.get(url("/v1/catalog/services?stale&consistent"), timeout=5).status_code == 400
    assert requests.get(url("/v1/catalog/services?filter=x"), timeout=5).status_code == 400
    assert requests.get(url("/v1/catalog/services?dc=elsewhere"), timeout=5).status_code == 500
    assert put("/v1/kv/x?flags=-1", b"v").status_code == 400
    assert put("/v1/kv/", b"v").status_code == 400  # missing key name
    r = put("/v1/kv/too-big", b"x" * (512 * 1024 + 1))
    assert r.status_code == 413 and "too large" in r.text
    assert put("/v1/kv/just-fits", b"x" * (512 * 1024)).json() is True
    assert put("/v1/session/create", json.dumps({"TTL": "5s"})).status_code == 400  # below 10s
    assert put("/v1/session/create", json.dumps({"Behavior": "explode"})).status_code == 400
    assert put("/v1/agent/check/update/x", json.dumps({"Status": "fine"})).status_code == 400
    # ...and the stand-in keeps serving everyone else.
    assert client.kv.put("after/errors", "ok") is True
    client.kv.delete("just-fits")


def test_acl_token_is_required_on_every_request(tmp_path: Path) -> None:
    proc, host, port = _start(tmp_path, "--acl-token", "s3cret")
    try:
        anonymous = consul.Consul(host=host, port=port)
        wrong = consul.Consul(host=host, port=port, token="guess")
        right = consul.Consul(host=host, port=port, token="s3cret")
        with pytest.raises(consul.ACLPermissionDenied, match="Permission denied"):
            anonymous.kv.put("k", "v")
        with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
            wrong.kv.get("k")
        with pytest.raises(consul.ACLPermissionDenied):
            wrong.agent.service.register("svc", port=1)
        with pytest.raises(consul.ACLPermissionDenied):
            anonymous.catalog.services()
        assert right.kv.put("k", "v") is True
        assert right.agent.service.register("svc", port=1) is True
        base = f"http://{host}:{port}"
        assert requests.get(f"{base}/v1/kv/k?token=s3cret", timeout=5).status_code == 200
        bearer = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{base}/v1/kv/k", headers=bearer, timeout=5).status_code == 200
        r = requests.get(f"{base}/v1/kv/k", headers={"X-Consul-Token": "nope"}, timeout=5)
        assert r.status_code == 403 and r.text == "ACL not found"
        assert anonymous.status.leader() == "127.0.0.1:8300"  # status needs no token, as in Consul
        assert right.kv.get("k")[1]["Value"] == b"v"  # nothing the refused writes did
    finally:
        proc.stop()


def test_data_file_keeps_state_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "standin.json"
    proc, host, port = _start(tmp_path, "--data", str(data))
    try:
        c = consul.Consul(host=host, port=port)
        c.kv.put("kept/doc", "v1")
        c.agent.service.register("kept", service_id="kept-1", port=9, check=consul.Check.ttl("60s"))
        c.agent.check.ttl_pass("service:kept-1")
        sid = c.session.create(ttl=60, lock_delay=0)
        c.kv.put("kept/lock", "me", acquire=sid)
        index_before, entry_before = c.kv.get("kept/doc")
        top_index = int(c.catalog.services()[0])
    finally:
        assert proc.stop() == 0
    proc, host, port = _start(tmp_path, "--data", str(data))
    try:
        c = consul.Consul(host=host, port=port)
        index_after, entry_after = c.kv.get("kept/doc")
        assert entry_after == entry_before and index_after == index_before
        assert c.kv.get("kept/lock")[1]["Session"] == sid
        assert c.session.info(sid)[1]["ID"] == sid
        assert c.agent.checks()["service:kept-1"]["Status"] == "passing"
        assert [e["Service"]["ID"] for e in c.health.service("kept", passing=True)[1]] == ["kept-1"]
        assert c.kv.put("kept/new", "x") is True
        assert c.kv.get("kept/new")[1]["ModifyIndex"] > max(top_index, int(index_before))  # no going back
    finally:
        proc.stop()
