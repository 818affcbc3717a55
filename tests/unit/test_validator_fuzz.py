"""Hostile input to the validators: whatever document an apply, a snapshot push, a bootstrap
file, a CSR or a token string carries, each validator either returns a valid value or raises
its own error (``ConfigError``, ``SnapshotError``, ``bootstrap.ConfigError``, ``CsrError``,
``TokenError``) with a one-line message; never another exception.

The documents are YAML-ish (what ``yaml.safe_load`` can give: dicts with str, int, bool or
None keys, lists, str, int, float including NaN and infinities, bool, None), either drawn
whole from a recursive strategy or made by mutating valid documents (replace, delete, add or
duplicate a node anywhere). The default suite runs each property a little
(``FAST``); ``pytest -m fuzz`` runs them long (``FUZZ``).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.ca import CertificateAuthority, CsrError, Issued
from mesh_common import bootstrap
from mesh_common.config import (
    ApplyPlan,
    ConfigError,
    ConfigObject,
    Document,
    check_name,
    compile_authz,
    compile_routes,
    kind_of,
    parse_object,
    plan_apply,
    to_doc,
    to_yaml,
)
from mesh_common.jointoken import JoinToken, TokenError, parse_token
from mesh_common.limits import Limits
from mesh_common.snapshot import (
    Cluster,
    Endpoint,
    Snapshot,
    SnapshotError,
    from_doc,
    from_json,
)

pytestmark = pytest.mark.timeout(300)

TD = "mesh.local"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
FAST = settings(deadline=None, max_examples=100, suppress_health_check=_SUPPRESS)
FUZZ = settings(deadline=None, max_examples=5000, suppress_health_check=_SUPPRESS)

# ---------------------------------------------------------------------- YAML-ish values
KNOWN_KEYS = (
    # config documents
    "kind", "name", "spec", "service", "rules", "match", "method", "headers", "destinations",
    "subset", "weight", "timeout_ms", "load_balancer", "retries", "limits",
    "outlier_detection", "delay", "abort", "ms", "percent", "code", "exact", "prefix", "regex",
    "mode", "action", "sources", "methods", "max_attempts", "retry_on", "per_try_timeout_ms",
    "backoff_base_ms", "backoff_max_ms", "max_request_bytes", "non_idempotent",
    "budget_percent", "budget_min_per_s", "budget_window_s", "max_connections", "max_pending",
    "max_requests", "max_retries", "consecutive_errors", "error_codes", "base_ejection_ms",
    "max_ejection_ms", "max_ejection_percent", "half_open_probes",
    "success_rate_min_requests", "success_rate_threshold",
    # snapshots
    "version", "clusters", "routes", "endpoints", "address", "spiffe_id", "instance",
    "labels", "healthy", "authz", "revoked", "cluster", "faults", "default", "policies",
    "dry_run",
    # bootstrap
    "trust_domain", "tls", "cert", "key", "ca", "inbound", "outbound", "admin", "listen",
    "app", *(f for f in Limits.__dataclass_fields__),
)
INTERESTING = (
    "Route", "TrafficPolicy", "Fault", "AuthorizationPolicy", "route", "echo", "order", "",
    " ", "x" * 300, "-", "a-", "Echo", "/", "/pkg.Svc/M", "/pkg.Svc/", "pkg.Svc/M", "*",
    "/pkg.*", "spiffe://mesh.local/service/echo", "spiffe://other/service/echo",
    "spiffe://mesh.local/*", "127.0.0.1:80", "[::1]:1", "[zz]:1", "host:0", "host:65536",
    ":80", "127.0.0.1:", "UNAVAILABLE", "ok", "OK", "internal", "round_robin", "peak_ewma",
    "ALLOW", "deny", "DENY", "enforce", "dry_run", "(", "(?P<x>", "a{1000000}", "\x00",
    "line\nbreak", "tab\there", "é", "\u202e", "１２", "²", "nan", "1e309", "v1", "ab12",
    "ABCD", "0" * 41, "(" * 510 + ")" * 510, "a{99999999999}", "[[:alpha:]]",
)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16),
    st.sampled_from(INTERESTING))
_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(-3, 3),
                  st.booleans(), st.none())
yamlish = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=30)
"""Any value a YAML document can hold (dict keys hashable scalars)."""


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every node of ``value`` (the root is ``()``), by the keys and indexes leading to it."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated(draw: st.DrawFn, seeds: list[Any]) -> Any:
    """A valid document of ``seeds`` with 1-4 mutations: a node replaced by any value, a key
    or list item deleted, a key added (often a known one), a list item duplicated."""
    doc = copy.deepcopy(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(doc))))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if op == "replace" or not path and op == "delete":
            new = draw(yamlish)
            if not path:
                doc = new
            else:
                _at(doc, path[:-1])[path[-1]] = new
        elif op == "delete":
            parent = _at(doc, path[:-1])
            del parent[path[-1]]
        elif op == "add":
            node = _at(doc, path)
            if isinstance(node, dict):
                node[draw(_keys)] = draw(yamlish)
            elif isinstance(node, list):
                node.insert(draw(st.integers(0, len(node))), draw(yamlish))
        else:
            node = _at(doc, path)
            if isinstance(node, list) and node:
                node.append(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
    return doc


def _one_line(exc: BaseException) -> None:
    """The refusal's message is one non-empty line."""
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} without a message"
    assert "\n" not in message and "\r" not in message, message


def _refused_or(fn: Callable[[], Any], error: type[Exception], *, one_line: bool = True) -> Any:
    """``fn()``'s value, or None when it raises ``error`` with a message (one line unless
    ``one_line`` is False); any other exception fails the test."""
    try:
        return fn()
    except error as exc:
        if one_line:
            _one_line(exc)
        else:
            assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


def _bootstrap_refused_or(fn: Callable[[], Any]) -> Any:
    """``_refused_or`` for ``mesh_common.bootstrap``, whose errors echo unknown keys as they
    are (a key with a line break makes two lines: a local file's own text, printed once on
    stderr), so only a message is required of them."""
    return _refused_or(fn, bootstrap.ConfigError, one_line=False)


# ---------------------------------------------------------------------- valid seeds
SEED_CONFIG: list[dict[str, Any]] = [
    {"kind": "Route", "name": "echo-canary", "spec": {
        "service": "echo", "timeout_ms": 2000, "rules": [
            {"name": "canary", "match": {"method": {"prefix": "/meshtest.Echo/"},
                                         "headers": {"x-canary": {"exact": "yes"},
                                                     "x-user": {"regex": "u[0-9]+"}}},
             "destinations": [{"subset": {"version": "v2"}, "weight": 100}],
             "timeout_ms": 500},
            {"destinations": [{"subset": {"version": "v1"}, "weight": 90},
                              {"subset": {"version": "v2"}}]}]}},
    {"kind": "TrafficPolicy", "name": "echo", "spec": {
        "service": "echo", "load_balancer": "round_robin", "timeout_ms": 1000,
        "retries": {"max_attempts": 3, "retry_on": ["UNAVAILABLE", 8],
                    "per_try_timeout_ms": 300, "backoff_base_ms": 25, "backoff_max_ms": 250,
                    "max_request_bytes": 1048576,
                    "non_idempotent": [{"exact": "/meshtest.Echo/ServerStream"}],
                    "budget_percent": 20, "budget_min_per_s": 10.5, "budget_window_s": 10},
        "limits": {"max_connections": 64, "max_pending": 128, "max_requests": 256,
                   "max_retries": 8},
        "outlier_detection": {"consecutive_errors": 5, "error_codes": ["UNAVAILABLE", 13],
                              "base_ejection_ms": 30000, "max_ejection_ms": 300000,
                              "max_ejection_percent": 50, "half_open_probes": 1,
                              "success_rate_min_requests": 100,
                              "success_rate_threshold": 0.8}}},
    {"kind": "Fault", "name": "echo-chaos", "spec": {
        "service": "echo", "method": {"exact": "/meshtest.Echo/Unary"},
        "delay": {"ms": 200, "percent": 50}, "abort": {"code": "UNAVAILABLE", "percent": 10}}},
    {"kind": "AuthorizationPolicy", "name": "echo-callers", "spec": {
        "service": "echo", "mode": "dry_run", "rules": [
            {"action": "DENY", "sources": ["spiffe://mesh.local/service/evil"]},
            {"action": "allow", "sources": ["spiffe://mesh.local/service/*", "*"],
             "methods": ["/meshtest.Echo/", "/meshtest.Echo/Unary", "*"]}]}},
]


def _seed_snapshot() -> dict[str, Any]:
    objects = plan_apply((), [Document("seed", i, d) for i, d in
                              enumerate(SEED_CONFIG, 1)]).objects
    routes, _ = compile_routes(objects, ["echo", "store"])
    clusters = (
        Cluster("echo", (Endpoint("127.0.0.1", 8081, f"spiffe://{TD}/service/echo", "echo-1",
                                  (("version", "v1"),), True),
                         Endpoint("::1", 8082, f"spiffe://{TD}/service/echo", "echo-2",
                                  (("version", "v2"),), False))),
        Cluster("store", ()))
    snap = Snapshot("42", clusters, routes, compile_authz(objects, "deny"), ("ab12", "ff"))
    return snap.to_doc()


SEED_SNAPSHOT = _seed_snapshot()
SEED_BOOTSTRAP: dict[str, Any] = {
    "service": "echo", "trust_domain": TD,
    "tls": {"cert": "/tmp/c.pem", "key": "/tmp/k.pem", "ca": "/tmp/ca.pem"},
    "inbound": {"listen": "0.0.0.0:15006", "app": "127.0.0.1:8080"},
    "outbound": {"listen": "127.0.0.1:15001"}, "admin": {"listen": "127.0.0.1:15000"},
    "clusters": [{"name": "store", "endpoints": [
        {"address": "127.0.0.1:9001", "spiffe_id": f"spiffe://{TD}/service/store"},
        {"address": "[::1]:9002"}]}],
    "limits": {"max_message_bytes": 1024, "handshake_timeout_s": 2.5,
               "max_connections_per_peer": 8, "stall_timeout_s": 0},
}


def test_the_seeds_are_valid() -> None:
    """Mutations start from valid documents (else they would prove little)."""
    plan_apply((), [Document("seed", i, d) for i, d in enumerate(SEED_CONFIG, 1)])
    from_doc(SEED_SNAPSHOT, TD)
    bootstrap.parse_bootstrap(SEED_BOOTSTRAP)


# ---------------------------------------------------------------------- config (apply)
def _check_config_object(obj: ConfigObject) -> None:
    """A document that validated is canonical-stable and compiles."""
    doc = to_doc(obj)
    assert parse_object(doc) == obj
    assert yaml.safe_load(to_yaml(doc)) == json.loads(json.dumps(doc))
    compile_routes([obj], [])
    compile_authz([obj])


def _config_property(body: Any) -> None:
    obj = _refused_or(lambda: parse_object(body, "fuzz.yaml", 1), ConfigError)
    if obj is not None:
        _check_config_object(obj)


@FAST
@given(body=yamlish)
def test_any_yaml_value_is_an_object_or_a_config_error(body: Any) -> None:
    _config_property(body)


@FAST
@given(body=mutated(SEED_CONFIG))
def test_a_mutated_config_document_is_an_object_or_a_config_error(body: Any) -> None:
    _config_property(body)


def _apply_property(bodies: list[Any]) -> None:
    stored = plan_apply((), [Document("seed", i, d) for i, d in
                             enumerate(SEED_CONFIG, 1)]).objects
    docs = [Document("fuzz.yaml", i, b) for i, b in enumerate(bodies, 1)]
    plan = _refused_or(lambda: plan_apply(stored, docs), ConfigError)
    if plan is not None:
        assert isinstance(plan, ApplyPlan)
        compile_routes(plan.objects, ["echo"])
        compile_authz(plan.objects, "deny")


@FAST
@given(bodies=st.lists(mutated(SEED_CONFIG) | yamlish, min_size=1, max_size=4))
def test_an_apply_of_garbage_plans_or_names_the_problem(bodies: list[Any]) -> None:
    _apply_property(bodies)


@FAST
@given(value=yamlish)
def test_kind_and_name_checks_refuse_with_a_config_error(value: Any) -> None:
    if isinstance(value, str):
        _refused_or(lambda: kind_of(value), ConfigError)
    _refused_or(lambda: check_name(value), ConfigError)


# ---------------------------------------------------------------------- snapshots
def _snapshot_property(doc: Any) -> None:
    snap = _refused_or(lambda: from_doc(doc, TD), SnapshotError)
    if snap is not None:
        again = from_doc(snap.to_doc(), TD)
        assert again.content_hash() == snap.content_hash()
        assert again.version == snap.version


@FAST
@given(doc=yamlish)
def test_any_value_is_a_snapshot_or_a_snapshot_error(doc: Any) -> None:
    _snapshot_property(doc)


@FAST
@given(doc=mutated([SEED_SNAPSHOT]))
def test_a_mutated_snapshot_is_a_snapshot_or_a_snapshot_error(doc: Any) -> None:
    _snapshot_property(doc)


def _jsonable(value: Any) -> bool:
    """JSON (what a snapshot push carries) has string keys and finite numbers only."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return True


@FAST
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      mutated([SEED_SNAPSHOT]).filter(_jsonable).map(json.dumps)))
def test_snapshot_json_text_is_a_snapshot_or_a_snapshot_error(text: str | bytes) -> None:
    _refused_or(lambda: from_json(text, TD), SnapshotError)


# ---------------------------------------------------------------------- bootstrap
@FAST
@given(doc=st.one_of(yamlish, mutated([SEED_BOOTSTRAP["limits"]])))
def test_limits_are_limits_or_a_config_error(doc: Any) -> None:
    limits = _bootstrap_refused_or(lambda: bootstrap.parse_limits(doc))
    if limits is not None:
        assert isinstance(limits, Limits)


@FAST
@given(doc=st.one_of(yamlish, mutated([SEED_BOOTSTRAP])))
def test_a_bootstrap_file_is_a_bootstrap_or_a_config_error(doc: Any) -> None:
    _bootstrap_refused_or(lambda: bootstrap.parse_bootstrap(doc))
    _bootstrap_refused_or(lambda: bootstrap.parse_bootstrap(doc, require_tls=False))


# ---------------------------------------------------------------------- CSRs and tokens
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
_AUTHORITY = CertificateAuthority.create_root(TD, NOW)
_KEY = ec.generate_private_key(ec.SECP256R1())
_CSR = (x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo")]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{TD}/service/echo")]), critical=False)
        .sign(_KEY, hashes.SHA256()))
CSR_DER = _CSR.public_bytes(serialization.Encoding.DER)
CSR_PEM = _CSR.public_bytes(serialization.Encoding.PEM)


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with 1-6 byte flips, deletions, insertions or truncations."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[pos]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[pos:]
    return bytes(data)


def _csr_property(data: bytes) -> None:
    issued = _refused_or(
        lambda: _AUTHORITY.sign_workload_csr(data, "echo", NOW, dt.timedelta(hours=1)), CsrError)
    if issued is not None:
        assert isinstance(issued, Issued) and issued.spiffe_id == f"spiffe://{TD}/service/echo"


@FAST
@given(data=st.one_of(mutated_bytes(CSR_DER), mutated_bytes(CSR_PEM), st.binary(max_size=300)))
def test_any_csr_bytes_are_signed_or_refused_with_a_csr_error(data: bytes) -> None:
    _csr_property(data)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_SEED_TOKEN = {"id": "abc123def456", "s": _b64(b"k" * 32), "ca": "0" * 64,
               "join": "127.0.0.1:15011", "api": "[::1]:15010"}


@FAST
@given(text=st.one_of(st.text(max_size=120), st.builds(lambda t: "mesh1." + t, st.text()),
                      st.builds(lambda b: "mesh1." + _b64(b), st.binary(max_size=200)),
                      st.builds(lambda v: "mesh1." + _b64(json.dumps(v).encode()),
                                yamlish.filter(_jsonable)),
                      st.builds(lambda v: "mesh1." + _b64(json.dumps(v).encode()),
                                mutated([_SEED_TOKEN]).filter(_jsonable))))
def test_any_token_string_is_a_token_or_a_token_error(text: str) -> None:
    token = _refused_or(lambda: parse_token(text), TokenError)
    if token is not None:
        assert isinstance(token, JoinToken) and parse_token(token.encode()) == token


# ---------------------------------------------------------------------- long runs
@pytest.mark.fuzz
@FUZZ
@given(body=st.one_of(yamlish, mutated(SEED_CONFIG)))
def test_fuzz_config_documents(body: Any) -> None:
    _config_property(body)


@pytest.mark.fuzz
@FUZZ
@given(bodies=st.lists(mutated(SEED_CONFIG) | yamlish, min_size=1, max_size=6))
def test_fuzz_applies(bodies: list[Any]) -> None:
    _apply_property(bodies)


@pytest.mark.fuzz
@FUZZ
@given(doc=st.one_of(yamlish, mutated([SEED_SNAPSHOT])))
def test_fuzz_snapshots(doc: Any) -> None:
    _snapshot_property(doc)


@pytest.mark.fuzz
@FUZZ
@given(doc=st.one_of(yamlish, mutated([SEED_BOOTSTRAP])))
def test_fuzz_bootstrap(doc: Any) -> None:
    _bootstrap_refused_or(lambda: bootstrap.parse_bootstrap(doc))
    _bootstrap_refused_or(lambda: bootstrap.parse_limits(doc))


@pytest.mark.fuzz
@FUZZ
@given(data=st.one_of(mutated_bytes(CSR_DER), mutated_bytes(CSR_PEM)))
def test_fuzz_csrs(data: bytes) -> None:
    _csr_property(data)
