"""How the Consul registry writes an instance into Consul's service Meta and reads it back
(control_plane.registry.consul, pure parts): every instance the mesh accepts round-trips,
and every Meta it writes obeys Consul's rules (64 pairs, keys of [A-Za-z0-9_-] up to 128
characters not starting with "consul-", values up to 512 bytes)."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.registry import HEALTH_VALUES, Instance, sort_labels
from control_plane.registry.consul import (
    META_MAX_PAIRS,
    check_id,
    decode_service,
    deregister_after_s,
    encode_meta,
    label_from_meta_key,
    label_meta_key,
    load_replica_id,
    parse_health_entry,
    service_id,
    validate_prefix,
)

pytestmark = pytest.mark.timeout(60)

LABEL_KEY_CHARS = string.ascii_letters + string.digits + "-_./"
META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def consul_accepts(meta: dict[str, str]) -> bool:
    """Consul's validateMetaPair rules for service meta."""
    return len(meta) <= META_MAX_PAIRS and all(
        META_KEY.match(k) and not k.startswith("consul-") and len(v.encode()) <= 512
        for k, v in meta.items())


def address_of(inst: Instance) -> tuple[str, int]:
    if not inst.inbound:
        return "", 0
    host, _, port = inst.inbound.rpartition(":")
    return host.strip("[]"), int(port)


def round_trip(inst: Instance) -> Instance:
    meta, truncated = encode_meta(inst, "mesh", "replica-a", "inc1")
    assert consul_accepts(meta)
    assert not truncated
    decoded = decode_service(inst.service, *address_of(inst), meta)
    assert decoded is not None
    assert (decoded.replica, decoded.incarnation) == ("replica-a", "inc1")
    return decoded.instance


def inst(**kw: object) -> Instance:
    base: dict[str, object] = dict(service="payment", instance_id="payment-1",
                                   spiffe_id="spiffe://mesh.local/service/payment",
                                   inbound="127.0.0.1:7001", outbound="127.0.0.1:7002",
                                   admin="127.0.0.1:7003", health="SERVING",
                                   registered_at=1700000000.25)
    base.update(kw)
    return Instance(**base)  # type: ignore[arg-type]


def test_a_plain_instance_reads_back_exactly_with_labels_as_meta_pairs() -> None:
    i = inst(labels=sort_labels({"version": "v2", "zone": "a"}))
    meta, _ = encode_meta(i, "mesh", "r", "x")
    assert meta["label_version"] == "v2" and meta["label_zone"] == "a"
    assert meta["mesh_instance_id"] == "payment-1" and meta["mesh_connected"] == "true"
    assert meta["mesh_replica"] == "r" and meta["mesh_prefix"] == "mesh"
    assert round_trip(i) == i


def test_disconnected_and_outbound_only_instances_read_back() -> None:
    gone = inst(connected=False, disconnected_at=1700000100.5, health="NOT_SERVING")
    assert round_trip(gone) == gone
    outbound_only = inst(inbound="", admin="", health="")
    meta, _ = encode_meta(outbound_only, "mesh", "r", "x")
    assert "mesh_admin" not in meta and "mesh_health" not in meta   # empty: left out
    assert round_trip(outbound_only) == outbound_only


def test_ipv6_inbound_reads_back() -> None:
    i = inst(inbound="[::1]:7001")
    assert round_trip(i) == i


def test_label_keys_with_dots_slashes_and_underscores_are_escaped_reversibly() -> None:
    for key in ("app.kubernetes.io/name", "a_b", "a__b", "_x_", "x.", "/", "v1_d"):
        mk = label_meta_key(key)
        assert META_KEY.match(mk), mk
        assert label_from_meta_key(mk) == key
    assert label_meta_key("app.kubernetes.io/name") == "label_app_dkubernetes_dio_sname"
    assert label_from_meta_key("mesh_health") is None
    assert label_from_meta_key("label_bad_x") is None   # not an escape this encoding makes


def test_too_many_or_too_long_labels_go_to_the_overflow_document() -> None:
    many = sort_labels({f"k{i:03d}": "v" * 200 for i in range(120)})
    long_key = "a." * 31 + "b"   # 63 characters, escaped longer than 128
    labels = sort_labels({**dict(many), long_key: "x"})
    i = inst(labels=labels)
    meta, truncated = encode_meta(i, "mesh", "r", "x")
    assert not truncated and consul_accepts(meta)
    assert any(k.startswith("mesh_overflow_") for k in meta)
    assert round_trip(i) == i


def test_labels_that_cannot_fit_at_all_are_cut_and_flagged() -> None:
    huge = sort_labels({f"label-{i:04d}": "v" * 253 for i in range(400)})   # ~110 kB
    i = inst(labels=huge)
    meta, truncated = encode_meta(i, "mesh", "r", "x")
    assert truncated and consul_accepts(meta) and meta["mesh_truncated"] == "true"
    decoded = decode_service(i.service, *address_of(i), meta)
    assert decoded is not None and decoded.truncated
    kept = dict(decoded.instance.labels)
    assert 0 < len(kept) < len(huge)
    assert all(dict(huge)[k] == v for k, v in kept.items())
    assert decoded.instance.spiffe_id == i.spiffe_id   # the mesh's own fields are all kept


def test_a_value_over_512_bytes_goes_to_the_overflow_document() -> None:
    i = inst(labels=sort_labels({"note": "é" * 253}))   # 506 bytes: fits
    meta, _ = encode_meta(i, "mesh", "r", "x")
    assert "label_note" in meta
    long_id = "spiffe://mesh.local/service/" + "s" * 600
    j = inst(spiffe_id=long_id)
    meta, _ = encode_meta(j, "mesh", "r", "x")
    assert "mesh_spiffe_id" not in meta and consul_accepts(meta)
    assert round_trip(j) == j


def test_meta_of_another_encoding_or_damaged_is_not_an_instance() -> None:
    meta, _ = encode_meta(inst(), "mesh", "r", "x")
    assert decode_service("payment", "127.0.0.1", 7001, {**meta, "mesh_v": "2"}) is None
    assert decode_service("payment", "127.0.0.1", 7001, {"version": "1"}) is None
    bad_time = {**meta, "mesh_registered_at": "soon"}
    assert decode_service("payment", "127.0.0.1", 7001, bad_time) is None
    spilled, _ = encode_meta(inst(spiffe_id="s" * 900), "mesh", "r", "x")
    spilled["mesh_overflow_0"] = "{not json"
    assert decode_service("payment", "127.0.0.1", 7001, spilled) is None


def test_service_ids_are_safe_unique_and_stable() -> None:
    a = service_id("mesh", "a-b", "c")
    b = service_id("mesh", "a", "b-c")
    assert a != b and a.startswith("mesh-a-b-c-") and b.startswith("mesh-a-b-c-")
    assert service_id("mesh", "x/y", "1") != service_id("mesh", "x_y", "1")
    weird = service_id("mesh", "svc", "id with/slashes:and?query" + "z" * 300)
    assert re.match(r"^[A-Za-z0-9_.-]+$", weird) and len(weird) <= 113
    assert service_id("mesh", "svc", "i") == service_id("mesh", "svc", "i")
    assert check_id(a) == f"service:{a}"


def entry(inst_: Instance, *, prefix: str = "mesh", sid: str | None = None,
          status: str = "passing", serf: str = "passing") -> dict[str, object]:
    meta, _ = encode_meta(inst_, prefix, "r", "x")
    host, port = address_of(inst_)
    sid = sid or service_id(prefix, inst_.service, inst_.instance_id)
    return {"Service": {"ID": sid, "Service": inst_.service, "Address": host, "Port": port,
                        "Meta": meta, "Tags": ["mesh"]},
            "Checks": [{"CheckID": "serfHealth", "ServiceID": "", "Status": serf},
                       {"CheckID": check_id(sid), "ServiceID": sid, "Status": status}]}


def test_health_entries_of_this_mesh_are_parsed_with_their_check_states() -> None:
    i = inst()
    obs = parse_health_entry(entry(i, status="critical"), "mesh")
    assert obs is not None and obs.decoded.instance == i and obs.key == i.key
    assert obs.check_status == "critical" and not obs.node_critical
    node_down = parse_health_entry(entry(i, serf="critical"), "mesh")
    assert node_down is not None and node_down.node_critical


def test_health_entries_of_another_prefix_or_with_a_foreign_id_are_ignored() -> None:
    i = inst()
    assert parse_health_entry(entry(i, prefix="other"), "mesh") is None
    squatted = entry(i, sid=service_id("mesh", "payment", "someone-else"))
    assert parse_health_entry(squatted, "mesh") is None
    assert parse_health_entry({"Service": {"ID": "web", "Service": "web", "Meta": {}},
                               "Checks": []}, "mesh") is None


def test_deregister_after_respects_consuls_one_minute_floor() -> None:
    assert deregister_after_s(10, 6) == 60
    assert deregister_after_s(100, 6) == 106
    assert deregister_after_s(0.5, 0.25) == 60


@pytest.mark.parametrize("prefix", ["", "a b", "x/y", "p" * 65, "mesh:1"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        validate_prefix(prefix)


def test_replica_id_is_made_once_and_kept(tmp_path) -> None:
    first = load_replica_id(tmp_path / "data")
    assert first and load_replica_id(tmp_path / "data") == first
    assert load_replica_id(tmp_path / "other") != first


label_keys = st.text(LABEL_KEY_CHARS, min_size=1, max_size=63)
label_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=253)


@settings(max_examples=150, deadline=None)
@given(labels=st.dictionaries(label_keys, label_values, max_size=12),
       health=st.sampled_from(sorted(HEALTH_VALUES)),
       connected=st.booleans(),
       iid=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF,
                                 blacklist_categories=("Cs", "Zs")),
                   min_size=1, max_size=253),
       registered_at=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_every_instance_the_mesh_accepts_round_trips(labels: dict[str, str], health: str,
                                                      connected: bool, iid: str,
                                                      registered_at: float) -> None:
    i = inst(labels=sort_labels(labels), health=health, instance_id=iid,
             registered_at=registered_at, connected=connected,
             disconnected_at=None if connected else registered_at + 1)
    assert round_trip(i) == i
