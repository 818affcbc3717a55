"""Leader election's decision logic (control_plane.leader.Election) without sockets: events in,
steps and leadership out, time passed in. Also the lock's value, replica identities, the
sidecar's join-address rotation and the CA key file's mode check."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.leader import (
    ACQUIRE,
    CREATE_SESSION,
    PAUSE,
    RENEW,
    WATCH,
    Election,
    LeaderInfo,
    SoleLeader,
    replica_of,
    replica_spiffe_id,
)
from control_plane.main import check_ca_key_mode

TD = "mesh.local"
ME = LeaderInfo("cp-a", "inc-a", "127.0.0.2:15011", "127.0.0.2:15010")
OTHER = LeaderInfo("cp-b", "inc-b", "127.0.0.3:15011", "127.0.0.3:15010", since=1.0)
TTL_S = 10.0


def entry(info: LeaderInfo | None, session: str | None) -> dict[str, object]:
    """The leader key as py-consul returns it."""
    return {"Key": "mesh/leader", "Value": info.encode() if info else None,
            "Session": session, "ModifyIndex": 7}


def leading(now: float = 0.0) -> Election:
    """An election that created session S1 at ``now`` and acquired the key."""
    e = Election(ME, TTL_S)
    e.session_created("S1", now)
    e.acquired(True, now)
    return e


# ---------------------------------------------------------------------- the lock's value
def test_leader_info_round_trips_and_garbage_is_none() -> None:
    assert LeaderInfo.decode(OTHER.encode()) == OTHER
    for raw in (None, b"", b"not json", b"[]", b'{"v": 2}',
                json.dumps({"v": 1, "replica": "x", "incarnation": "i", "join": "",
                            "api": "a:1"}).encode(),
                json.dumps({"v": 1, "replica": "x", "incarnation": "i", "join": "j:1",
                            "api": "a:1", "since": "soon"}).encode()):
        assert LeaderInfo.decode(raw) is None


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_value_or_none(raw: bytes) -> None:
    assert LeaderInfo.decode(raw) is None or isinstance(LeaderInfo.decode(raw), LeaderInfo)


def test_replica_identity_round_trips_and_other_identities_are_not_replicas() -> None:
    uri = replica_spiffe_id(TD, "host-a_1.x")
    assert replica_of(uri, TD) == "host-a_1.x"
    for other in (f"spiffe://{TD}/service/payment", f"spiffe://{TD}/admin/meshctl",
                  f"spiffe://{TD}/control-plane", f"spiffe://{TD}/control-plane/",
                  f"spiffe://{TD}/control-plane/a/b", "spiffe://other.td/control-plane/a",
                  f"spiffe://{TD}/control-plane/" + "x" * 129):
        assert replica_of(other, TD) is None


# ---------------------------------------------------------------------- the steps
def test_a_new_replica_creates_a_session_then_tries_the_lock_at_once() -> None:
    e = Election(ME, TTL_S)
    assert e.step(0.0).kind == CREATE_SESSION
    assert not e.is_leader(0.0) and e.leader(0.0) is None
    e.session_created("S1", 0.0)
    assert e.step(0.1).kind == ACQUIRE


def test_acquiring_makes_it_the_leader_and_it_renews_every_third_of_the_ttl() -> None:
    e = leading()
    assert e.is_leader(0.5) and e.leader(0.5) == ME
    step = e.step(0.5)
    assert step.kind == WATCH and step.wait_s == pytest.approx(TTL_S / 3 - 0.5)
    assert e.step(TTL_S / 3).kind == RENEW
    e.renewed(TTL_S / 3)
    assert e.is_leader(TTL_S / 3 + e.lease_s - 0.01)


def test_a_leader_that_cannot_renew_steps_down_before_consul_would_drop_its_session() -> None:
    e = leading()
    t = TTL_S / 3
    while t < TTL_S:   # Consul away: every renewal fails, the pauses grow but stay capped
        step = e.step(t)
        if step.kind == PAUSE:
            assert 0 < step.wait_s <= e.max_backoff_s
            t += step.wait_s
            continue
        assert step.kind == RENEW
        e.failed(t)
        t += 0.01
    assert e.lease_s < TTL_S
    assert e.is_leader(e.lease_s - 0.01)
    assert not e.is_leader(e.lease_s) and e.leader(e.lease_s) is None


def test_a_session_consul_invalidated_means_not_leader_and_a_new_session() -> None:
    e = leading()
    e.session_gone()
    assert not e.is_leader(1.0) and e.leader(1.0) is None  # the key still names our old one
    assert e.step(1.0).kind == CREATE_SESSION
    e.session_created("S2", 1.0)
    e.observed_entry(entry(ME, "S1"))   # Consul has not released the old one yet
    assert not e.is_leader(1.1) and e.leader(1.1) is None
    assert e.step(1.1).kind == WATCH
    e.observed_entry(entry(ME, None))   # released: try again
    assert e.step(1.2).kind == ACQUIRE


def test_a_follower_knows_the_leader_and_watches_instead_of_acquiring() -> None:
    e = Election(ME, TTL_S)
    e.session_created("S1", 0.0)
    e.acquired(False, 0.0)
    e.observed_entry(entry(OTHER, "S9"))
    assert not e.is_leader(1.0) and e.leader(1.0) == OTHER
    assert e.step(1.0).kind == WATCH
    assert e.step(1.0).wait_s == pytest.approx(TTL_S / 3 - 1.0)


def test_a_leader_that_sees_another_holder_steps_down_at_once() -> None:
    e = leading()
    e.observed_entry(entry(OTHER, "S9"))
    assert not e.is_leader(0.1) and e.leader(0.1) == OTHER


def test_a_released_key_in_its_lock_delay_is_retried_until_acquired() -> None:
    e = Election(ME, TTL_S, retry_s=0.5)
    e.session_created("S1", 0.0)
    e.observed_entry(entry(OTHER, "S9"))
    e.observed_entry(entry(OTHER, None))      # the leader's session was invalidated
    assert e.leader(0.1) is None               # nobody leads now
    assert e.step(0.1).kind == ACQUIRE
    e.acquired(False, 0.1)                     # refused: the lock-delay runs
    step = e.step(0.2)
    assert step.kind == WATCH and step.wait_s == pytest.approx(0.4)
    assert e.step(0.6).kind == ACQUIRE
    e.acquired(True, 0.6)
    assert e.is_leader(0.7)


def test_a_holder_naming_this_replica_but_not_its_session_is_never_a_leader_to_forward_to(
) -> None:
    e = Election(ME, TTL_S)
    e.session_created("S2", 0.0)
    previous_life = LeaderInfo(ME.replica, "inc-old", ME.join_address, ME.api_address)
    e.observed_entry(entry(previous_life, "S1"))
    assert e.leader(0.1) is None and not e.is_leader(0.1)
    e.observed_entry({"Key": "mesh/leader", "Value": b"garbage", "Session": "S9"})
    assert e.leader(0.2) is None               # held, but by a value it cannot read


def test_a_failed_acquire_renews_first_the_session_may_be_gone() -> None:
    e = Election(ME, TTL_S)
    e.session_created("S1", 0.0)
    assert e.step(0.1).kind == ACQUIRE
    e.failed(0.1, renew_next=True)
    step = e.step(0.1)
    assert step.kind == PAUSE and step.wait_s == pytest.approx(e.retry_s)
    assert e.step(0.1 + e.retry_s).kind == RENEW


def test_session_ttl_outside_consuls_bounds_is_refused() -> None:
    for ttl in (9.9, 86400.1):
        with pytest.raises(ValueError, match="TTL"):
            Election(ME, ttl)


async def test_the_only_control_plane_always_leads() -> None:
    sole = SoleLeader()
    await sole.start("127.0.0.1:15011", "127.0.0.1:15010")
    assert sole.is_leader()
    leader = sole.leader()
    assert leader is not None and leader.join_address == "127.0.0.1:15011"
    assert sole.describe() == "this replica leads"


# ---------------------------------------------------------------------- the sidecar's joins
async def test_a_join_tries_each_join_address_in_turn_then_backs_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh_common.jointoken import new_token
    from sidecar import dynamic
    from sidecar.rpc import Code, RpcError

    token = new_token("0" * 64, "127.0.0.2:1", "127.0.0.2:2")
    ident = dynamic.DynamicIdentity(token, "echo", TD,
                                    join_address=["127.0.0.2:1", "127.0.0.3:1"])
    tried: list[str] = []
    sleeps: list[float] = []

    class Unavailable(RpcError):
        def __init__(self) -> None:
            super().__init__(Code.UNAVAILABLE, "no leader elected yet")

    async def join_once(again: bool = False) -> None:
        tried.append(ident.join_address)
        if len(tried) < 5:
            raise Unavailable()

    async def sleep(s: float) -> None:
        sleeps.append(s)

    monkeypatch.setattr(ident, "_join_once", join_once)
    monkeypatch.setattr(dynamic.asyncio, "sleep", sleep)
    await ident.join()
    assert tried == ["127.0.0.2:1", "127.0.0.3:1"] * 2 + ["127.0.0.2:1"]
    assert sleeps == [0.2, 0.4]        # one pause per round of every address
    ident.close()


def test_the_join_address_defaults_to_the_tokens() -> None:
    from mesh_common.jointoken import new_token
    from sidecar.dynamic import DynamicIdentity

    token = new_token("0" * 64, "127.0.0.2:1", "127.0.0.2:2")
    assert DynamicIdentity(token, "echo", TD).join_addresses == ["127.0.0.2:1"]
    assert DynamicIdentity(token, "echo", TD, join_address="127.0.0.3:1").join_address == \
        "127.0.0.3:1"


# ---------------------------------------------------------------------- CA files
def test_a_ca_key_others_may_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "ca-key.pem"
    key.write_text("k")
    for mode in (0o600, 0o400):
        os.chmod(key, mode)
        check_ca_key_mode(key)
    for mode in (0o640, 0o644, 0o604):
        os.chmod(key, mode)
        with pytest.raises(click.BadParameter, match=f"mode {mode:04o}.*chmod 600"):
            check_ca_key_mode(key)


def test_replica_certificates_name_the_replica() -> None:
    from control_plane.ca import CertificateAuthority

    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.create_root(TD, now)
    issued, _ = ca.issue_keypair(replica_spiffe_id(TD, "cp-a"), "r", now,
                                 dt.timedelta(hours=1))
    assert replica_of(issued.spiffe_id, TD) == "cp-a"
