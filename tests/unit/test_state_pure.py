"""The pure parts of the control plane's state stores: the decisions both backends share
(``control_plane.state``) and the Consul KV encoding (``control_plane.kvstore``)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.kvstore import (
    Keys,
    audit_doc,
    audit_entry,
    cert_doc,
    cert_row,
    chunks,
    decode,
    encode,
    expired_buckets,
    key_segment,
    kv_op,
    last_segment_int,
    latest_revision_keys,
    revision_doc,
    revision_row,
    token_doc,
    token_row,
)
from control_plane.state import (
    MAX_AUDIT_FIELD_CHARS,
    AuditRow,
    CertRow,
    Revision,
    TokenRow,
    UseResult,
    barred_of,
    check_authz_default,
    cut_audit,
    unique,
    use_outcome,
)

T0 = 1_800_000_000.0


def tok(uses: int | None, expires_at: float = T0 + 60) -> TokenRow:
    return TokenRow("t1", "order", "d" * 64, expires_at, uses, T0)


# ---------------------------------------------------------------------- shared decisions
def test_a_use_of_a_limited_token_takes_one_and_the_last_use_leaves_it_used_up() -> None:
    result, after = use_outcome(tok(2), T0)
    assert result is UseResult.OK and after == tok(1)
    result, after = use_outcome(tok(1), T0)
    assert result is UseResult.OK and after == tok(0)
    assert use_outcome(tok(0), T0) == (UseResult.USED_UP, tok(0))


def test_an_unlimited_token_is_not_changed_by_a_use() -> None:
    assert use_outcome(tok(None), T0) == (UseResult.OK, tok(None))


def test_an_expired_or_unknown_token_gives_no_use() -> None:
    assert use_outcome(tok(5, expires_at=T0), T0) == (UseResult.EXPIRED, tok(5, expires_at=T0))
    assert use_outcome(None, T0) == (UseResult.UNKNOWN, None)


def test_audit_fields_are_cut_and_the_time_kept() -> None:
    row = cut_audit(AuditRow(T0, "i" * 5000, "a" * 5000, "o" * 5000, "r" * 5000))
    assert row.time == T0
    assert {len(row.identity), len(row.action), len(row.object), len(row.result)} == {
        MAX_AUDIT_FIELD_CHARS}


def cert(serial: str, iid: str, issued_at: float, service: str = "order") -> CertRow:
    return CertRow(serial, service, iid, f"spiffe://mesh.local/service/{service}", T0 + 3600,
                   issued_at)


def test_only_an_instance_whose_latest_certificate_is_revoked_is_barred() -> None:
    certs = [cert("a1", "o-1", 1), cert("a2", "o-1", 2), cert("b1", "o-2", 1),
             cert("p1", "o-1", 1, service="payment"), cert("d1", "-", 5)]
    assert barred_of(certs, ["a1"]) == set()                  # superseded by a2
    assert barred_of(certs, ["a2"]) == {("order", "o-1")}
    assert barred_of(certs, ["a2", "b1", "p1"]) == {("order", "o-1"), ("order", "o-2"),
                                                    ("payment", "o-1")}
    assert barred_of(certs, ["d1"]) == set()                  # "-" is never barred
    assert barred_of([], ["a2"]) == set()


def test_either_certificate_issued_at_the_latest_time_bars_when_revoked() -> None:
    certs = [cert("a1", "o-1", 2), cert("a2", "o-1", 2)]
    assert barred_of(certs, ["a1"]) == {("order", "o-1")}


def test_the_authz_default_is_allow_or_deny_only() -> None:
    assert check_authz_default("deny") == "deny"
    for bad in ("DENY", "", "block"):
        with pytest.raises(ValueError, match="allow or deny"):
            check_authz_default(bad)


def test_unique_keeps_the_first_of_each_in_order() -> None:
    assert unique(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


# ---------------------------------------------------------------------- Consul KV encoding
def test_plain_ids_are_their_own_key_segment() -> None:
    for text in ("a1f3", "order-1", "o_2", "v1.2", "-"):
        assert key_segment(text) == text


@pytest.mark.parametrize("text", ["", ".", "..", ".hidden", "a/b", "../x", "a b", "ü", "~1",
                                  "x" * 129, "100%", "a?b"])
def test_ids_that_could_change_the_path_are_hex_encoded(text: str) -> None:
    seg = key_segment(text)
    assert seg == "~" + text.encode().hex()
    assert "/" not in seg and not seg.startswith(".")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_different_ids_never_share_a_key_segment(a: str, b: str) -> None:
    seg = key_segment(a)
    assert "/" not in seg and seg not in ("", ".", "..")
    if a != b:
        assert seg != key_segment(b)


def test_keys_nest_under_the_prefix_and_sort_by_number() -> None:
    k = Keys("mesh")
    assert k.token("abc") == "mesh/tokens/abc"
    assert k.cert_of("o/1", "a1") == f"mesh/certs-by-instance/~{b'o/1'.hex()}/a1"
    assert k.certs() == "mesh/certs/" and not k.certs_of("x").startswith(k.certs())
    assert k.audit_row(1234, 1000) == "mesh/audit/rows/0000000001/000000001234"
    assert k.config_revision("Route", "r1", 7) == "mesh/config/Route/r1/0000000007"
    assert k.config_revision("Route", "r1", 10) > k.config_revision("Route", "r1", 9)


def test_values_round_trip_and_garbage_reads_as_nothing() -> None:
    t = tok(3)
    assert token_row(decode(encode(token_doc(t)))) == t
    c = cert("a1", "o-1", 5)
    assert cert_row(decode(encode(cert_doc(c, "t1")))) == c
    row = AuditRow(T0, "me", "apply", "Route/r", "ok")
    assert audit_entry(decode(encode(audit_doc(row, 42)))) == (42, row)
    rev = Revision("Route", "r1", 3, {"a": [1, 2]}, T0, True)
    assert revision_row(decode(encode(revision_doc("Route", "r1", 3, {"a": [1, 2]}, T0,
                                                   True)))) == rev
    for raw in (None, b"", b"not json", b"[1]", "\"x\"", b"\xff\xfe"):
        assert decode(raw) is None
    assert token_row({"token_id": 1}) is None
    assert cert_row({"serial": "a1"}) is None
    assert audit_entry({"seq": "x"}) is None
    assert revision_row({"kind": "Route"}) is None


def test_the_latest_revision_key_of_each_object_is_found() -> None:
    under = "m/config/"
    keys = ["m/config/Route/a/0000000001", "m/config/Route/a/0000000010",
            "m/config/Route/a/0000000002", "m/config/Route/b/0000000001",
            "m/config/stray", "m/config/Route/a/notanumber", "other/Route/a/0000000099"]
    assert latest_revision_keys(keys, under) == ["m/config/Route/a/0000000010",
                                                 "m/config/Route/b/0000000001"]


def test_numbered_segments_are_read_one_level_down_only() -> None:
    assert last_segment_int("m/audit/rows/0000000003/", "m/audit/rows/") == 3
    assert last_segment_int("m/config/R/a/0000000012", "m/config/R/a/") == 12
    assert last_segment_int("m/audit/rows/3/000001", "m/audit/rows/") is None
    assert last_segment_int("x/0001", "m/") is None
    assert last_segment_int("m/abc", "m/") is None


def test_a_bucket_goes_only_when_all_its_rows_are_past_retention() -> None:
    # 10 rows a bucket, keep 25: at seq 45 rows <= 20 are out, so buckets 0 and 1 (0-19) go.
    assert expired_buckets([0, 1, 2, 3, 4], 45, 25, 10) == [0, 1]
    assert expired_buckets([2, 3, 4], 49, 25, 10) == []       # floor 24: row 29 is kept
    assert expired_buckets([2, 3, 4], 54, 25, 10) == [2]      # floor 29: 20-29 out
    assert expired_buckets([0], 3, 25, 10) == []
    assert expired_buckets([0, 1, 2], 5, 3, 1) == [0, 1, 2]   # one row a bucket: exact


def test_chunks_and_txn_operations() -> None:
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunks([], 64) == []
    op = kv_op("cas", "m/k", b'{"a":1}', 0)
    assert op == {"KV": {"Verb": "cas", "Key": "m/k", "Index": 0,
                         "Value": base64.b64encode(b'{"a":1}').decode()}}
    assert kv_op("get", "m/k") == {"KV": {"Verb": "get", "Key": "m/k"}}
    assert json.loads(json.dumps(op)) == op
