"""The control plane's state in Consul's KV: ``ConsulStore``, the ``StateStore`` every
control-plane replica of one mesh shares (``mesh-control-plane --registry consul://...``).

**Layout.** Everything lives under ``<prefix>/`` (``--consul-prefix``, the same namespace the
Consul registry uses for its service IDs); every value is compact JSON (UTF-8) and carries
its own identifying fields, so keys only address:

=====================================================  ====================================
``<prefix>/tokens/<token_id>``                          a join token (the digest of its
                                                        secret, never the secret)
``<prefix>/certs/<serial>``                             an issued certificate
``<prefix>/certs-by-instance/<instance_id>/<serial>``   the same record, indexed by instance
``<prefix>/revoked/<serial>``                           a revocation (when, by whom)
``<prefix>/audit/seq``                                  the audit log's counter
``<prefix>/audit/rows/<bucket>/<seq>``                  one audit entry (``seq`` 12 digits,
                                                        ``bucket = seq // audit_bucket_rows``
                                                        10 digits)
``<prefix>/config/<kind>/<name>/<revision>``            one revision of a config object
                                                        (``revision`` 10 digits)
``<prefix>/meta/snapshot``                              the snapshot version counter and the
                                                        latest published version and hash
``<prefix>/meta/authz-default``                         the mesh-wide authorization default
=====================================================  ====================================

A key segment taken from outside (a token id, an instance id, a serial, a kind or name) is
kept as it is when it is 1-128 characters of ``[A-Za-z0-9_.-]`` not starting with ``.``,
else written as ``~`` and the hex of its UTF-8 (``key_segment``): no segment can add a path
level or collide with another.

**Writes never overwrite each other.** Every write is a check-and-set: ``PUT ?cas=`` with
the ModifyIndex just read (``cas=0``: only if absent), or a ``/v1/txn`` whose ``cas`` operations
carry those indexes (all of a transaction or none of it). A write that loses a race reads
again and retries (up to ``max_attempts`` times, with a short random backoff; then
``StateError``):

* ``use_token`` decrements ``uses_left`` with ``cas``: of two replicas spending the last use
  at once, exactly one wins (the other reads again and sees it used up);
* ``config_save`` creates every revision key of one apply in one transaction with ``cas``
  index 0: two replicas applying at once never get the same revision number (the loser
  retries with the next one), and an apply is all or nothing. Consul takes at most
  ``TXN_MAX_OPS`` (64) operations per transaction, so one apply changes at most 64 objects
  here (more: ``StateError`` saying to split it), and at most 512 KiB of JSON (Consul's
  ``txn_max_req_len`` and ``kv_max_value_size``);
* the snapshot version counter is one key; ``publish_snapshot``/``take_version_number``
  increment it with ``cas``, so numbers are monotonic across replicas and never handed out
  twice. Replicas publishing the same content get the same version (the hash is stored
  beside the counter);
* ``add_audit`` increments ``audit/seq`` and creates the row under the new number in one
  transaction (unique keys, a total order). The newest ``max_audit_rows`` are listed; older
  rows are deleted a bucket at a time when the counter enters a new bucket (so storage keeps
  up to ``audit_bucket_rows - 1`` more rows than are listed). ``list_audit`` with an action
  filter reads buckets newest first until it has enough rows (no index by action);
* ``record_certificate`` writes the record and its instance index in one transaction
  guarded by ``cas`` on the record; ``revoke`` creates revocations with ``cas`` index 0, up to
  64 in one transaction (a longer list: one transaction per 64).

**Reads** use Consul's default consistency (answered by the leader). Config listing reads the
revision keys (``?keys``) and then the latest revision of each object in read-only
transactions of up to 64 ``get`` operations.

**Watch.** ``watch`` runs one daemon thread per topic, each a blocking-query loop
(``consul_conn.blocking_get``): ``?keys`` on ``<prefix>/config/`` (config), the
``meta/authz-default`` key (authz), ``?keys`` on ``<prefix>/revoked/`` (revoked). A woken
query with news (the first answer, a new index, an index that went backwards) whose answer
differs from the last one seen (Consul wakes a query on an empty prefix for any KV write)
calls ``on_change(topic)`` on that thread; the server then reloads and republishes. The
replica's own writes wake it too (a reload that finds nothing new publishes nothing). Consul
unreachable: the loops retry with backoff, one warning per outage.

**Threads and errors.** Methods are blocking and thread-safe (one py-consul client per
thread). A Consul that cannot be reached, refuses the token, or refuses a request raises
``StateError`` with one line naming Consul's address and what failed; nothing is retried but
lost races.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
from consul.exceptions import ConsulException

from control_plane.consul_conn import (
    DEFAULT_TIMEOUT_S,
    MIN_QUERY_INTERVAL_S,
    BlockingIndex,
    ConsulTarget,
    blocking_get,
    connect,
    is_outage,
    target_from_env,
)
from control_plane.registry.consul import validate_prefix
from control_plane.state import (
    DEFAULT_AUTHZ,
    MAX_AUDIT_ROWS,
    WATCH_AUTHZ,
    WATCH_CONFIG,
    WATCH_REVOKED,
    AuditRow,
    CertRow,
    ConfigChange,
    DuplicateKey,
    Revision,
    RevokedRow,
    StateError,
    StateStore,
    TokenRow,
    UseResult,
    barred_of,
    check_authz_default,
    cut_audit,
    unique,
    use_outcome,
)
from control_plane.store import Store

log = logging.getLogger("mesh.control_plane.kvstore")

T = TypeVar("T")

TXN_MAX_OPS = 64
"""Consul's limit of operations in one ``/v1/txn``."""
KV_MAX_VALUE_BYTES = 512 * 1024
"""Consul's default ``kv_max_value_size``."""
DEFAULT_MAX_ATTEMPTS = 64
"""A write that keeps losing races this many times raises ``StateError``."""
DEFAULT_AUDIT_BUCKET_ROWS = 1000
DEFAULT_WATCH_WAIT_S = 30.0
DEFAULT_WATCH_MAX_BACKOFF_S = 5.0
MAX_RETRY_BACKOFF_S = 0.1
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_SEQ_DIGITS = 12
_BUCKET_DIGITS = 10
_REVISION_DIGITS = 10


# ---------------------------------------------------------------------- pure: keys and values
def key_segment(text: str) -> str:
    """``text`` as one KV path segment: itself when it is 1-128 of ``[A-Za-z0-9_.-]`` and does
    not start with ``.``, else ``~`` + the hex of its UTF-8 (so ``/``, ``..``, ``%`` or an empty
    id never change the path, and two different texts never share a segment). Pure."""
    if _SEGMENT_RE.fullmatch(text):
        return text
    return "~" + text.encode().hex()


@dataclass(frozen=True)
class Keys:
    """The KV keys of one mesh's state under ``prefix`` (see the module docstring). Pure."""

    prefix: str

    def tokens(self) -> str:
        return f"{self.prefix}/tokens/"

    def token(self, token_id: str) -> str:
        return self.tokens() + key_segment(token_id)

    def certs(self) -> str:
        return f"{self.prefix}/certs/"

    def cert(self, serial: str) -> str:
        return self.certs() + key_segment(serial)

    def certs_of(self, instance_id: str) -> str:
        return f"{self.prefix}/certs-by-instance/{key_segment(instance_id)}/"

    def cert_of(self, instance_id: str, serial: str) -> str:
        return self.certs_of(instance_id) + key_segment(serial)

    def revocations(self) -> str:
        return f"{self.prefix}/revoked/"

    def revoked(self, serial: str) -> str:
        return self.revocations() + key_segment(serial)

    def audit_seq(self) -> str:
        return f"{self.prefix}/audit/seq"

    def audit_rows(self) -> str:
        return f"{self.prefix}/audit/rows/"

    def audit_bucket(self, bucket: int) -> str:
        return f"{self.audit_rows()}{bucket:0{_BUCKET_DIGITS}d}/"

    def audit_row(self, seq: int, bucket_rows: int) -> str:
        return f"{self.audit_bucket(seq // bucket_rows)}{seq:0{_SEQ_DIGITS}d}"

    def config(self) -> str:
        return f"{self.prefix}/config/"

    def config_object(self, kind: str, name: str) -> str:
        return f"{self.config()}{key_segment(kind)}/{key_segment(name)}/"

    def config_revision(self, kind: str, name: str, revision: int) -> str:
        return f"{self.config_object(kind, name)}{revision:0{_REVISION_DIGITS}d}"

    def snapshot(self) -> str:
        return f"{self.prefix}/meta/snapshot"

    def authz(self) -> str:
        return f"{self.prefix}/meta/authz-default"


def encode(doc: Mapping[str, Any]) -> bytes:
    """A value as stored: compact JSON, UTF-8. Pure."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode(raw: bytes | str | None) -> dict[str, Any] | None:
    """A stored value as a JSON object, or None when it is missing, not JSON or not an
    object. Pure."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def token_doc(t: TokenRow) -> dict[str, Any]:
    return {"token_id": t.token_id, "service": t.service, "secret_digest": t.secret_digest,
            "expires_at": t.expires_at, "uses_left": t.uses_left, "created_at": t.created_at}


def token_row(doc: Mapping[str, Any] | None) -> TokenRow | None:
    """The token a value holds, or None when it is not one. Pure."""
    if doc is None:
        return None
    try:
        uses = doc["uses_left"]
        return TokenRow(_text(doc["token_id"]), _text(doc["service"]),
                        _text(doc["secret_digest"]), float(doc["expires_at"]),
                        None if uses is None else int(uses), float(doc["created_at"]))
    except (KeyError, TypeError, ValueError):
        return None


def cert_doc(c: CertRow, token_id: str | None) -> dict[str, Any]:
    return {"serial": c.serial, "service": c.service, "instance_id": c.instance_id,
            "spiffe_id": c.spiffe_id, "not_after": c.not_after, "issued_at": c.issued_at,
            "token_id": token_id}


def cert_row(doc: Mapping[str, Any] | None) -> CertRow | None:
    """The certificate record a value holds, or None. Pure."""
    if doc is None:
        return None
    try:
        return CertRow(_text(doc["serial"]), _text(doc["service"]), _text(doc["instance_id"]),
                       _text(doc["spiffe_id"]), float(doc["not_after"]),
                       float(doc["issued_at"]))
    except (KeyError, TypeError, ValueError):
        return None


def audit_doc(row: AuditRow, seq: int) -> dict[str, Any]:
    return {"seq": seq, "time": row.time, "identity": row.identity, "action": row.action,
            "object": row.object, "result": row.result}


def audit_entry(doc: Mapping[str, Any] | None) -> tuple[int, AuditRow] | None:
    """``(seq, row)`` of an audit value, or None. Pure."""
    if doc is None:
        return None
    try:
        return int(doc["seq"]), AuditRow(float(doc["time"]), _text(doc["identity"]),
                                         _text(doc["action"]), _text(doc["object"]),
                                         _text(doc["result"]))
    except (KeyError, TypeError, ValueError):
        return None


def revision_doc(kind: str, name: str, revision: int, spec: Mapping[str, Any],
                 applied_at: float, deleted: bool) -> dict[str, Any]:
    return {"kind": kind, "name": name, "revision": revision, "spec": dict(spec),
            "applied_at": applied_at, "deleted": deleted}


def revision_row(doc: Mapping[str, Any] | None) -> Revision | None:
    """The config revision a value holds, or None. Pure."""
    if doc is None:
        return None
    try:
        spec = doc["spec"]
        return Revision(_text(doc["kind"]), _text(doc["name"]), int(doc["revision"]),
                        spec if isinstance(spec, dict) else {}, float(doc["applied_at"]),
                        bool(doc["deleted"]))
    except (KeyError, TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def last_segment_int(key: str, under: str) -> int | None:
    """The integer the segment right below ``under`` in ``key`` spells (``.../0000000042`` or
    ``.../0000000042/`` -> 42), or None when ``key`` is not one level below ``under`` or the
    segment is not all digits. Pure."""
    if not key.startswith(under):
        return None
    rest = key[len(under):].removesuffix("/")
    if not rest or "/" in rest or not rest.isdigit():
        return None
    return int(rest)


def latest_revision_keys(keys: Iterable[str], config_prefix: str) -> list[str]:
    """Of the revision keys under ``config_prefix`` (``<kind>/<name>/<revision>``), the key
    of each object's highest revision, sorted. Other keys are ignored. Pure."""
    best: dict[str, tuple[int, str]] = {}
    for key in keys:
        if not key.startswith(config_prefix):
            continue
        parts = key[len(config_prefix):].split("/")
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        obj, revision = f"{parts[0]}/{parts[1]}", int(parts[2])
        if obj not in best or revision > best[obj][0]:
            best[obj] = (revision, key)
    return sorted(k for _, k in best.values())


def expired_buckets(buckets: Iterable[int], seq: int, max_rows: int, bucket_rows: int
                    ) -> list[int]:
    """The audit buckets all of whose rows are outside the newest ``max_rows`` once the
    counter is at ``seq`` (a bucket ``b`` holds ``b*bucket_rows ...
    (b+1)*bucket_rows - 1``), ascending. Pure."""
    floor = seq - max_rows  # rows numbered <= floor are out
    return sorted(b for b in set(buckets) if (b + 1) * bucket_rows - 1 <= floor)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``. Pure."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def kv_op(verb: str, key: str, value: bytes | None = None, index: int | None = None
          ) -> dict[str, Any]:
    """One KV operation of a ``/v1/txn`` body. Pure."""
    op: dict[str, Any] = {"Verb": verb, "Key": key}
    if value is not None:
        op["Value"] = base64.b64encode(value).decode()
    if index is not None:
        op["Index"] = index
    return {"KV": op}


# ---------------------------------------------------------------------- the store
class _Conflict(Exception):
    """A check-and-set lost a race: read again and retry."""


@dataclass(frozen=True)
class _Entry:
    key: str
    doc: dict[str, Any] | None
    modify_index: int


class ConsulStore(StateStore):
    """The ``StateStore`` in Consul's KV under ``prefix`` (see the module docstring).

    ``target``: where Consul is and how to reach it (``consul_conn``); ``request_timeout_s``:
    how long one request may take; ``max_audit_rows``/``audit_bucket_rows``: the audit log's
    retention and its deletion unit; ``max_attempts``: how many lost races a write survives;
    ``watch_wait_s``: how long a watch's blocking query waits."""

    def __init__(self, target: ConsulTarget, *, prefix: str = "mesh",
                 request_timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_audit_rows: int = MAX_AUDIT_ROWS,
                 audit_bucket_rows: int = DEFAULT_AUDIT_BUCKET_ROWS,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 watch_wait_s: float = DEFAULT_WATCH_WAIT_S,
                 watch_max_backoff_s: float = DEFAULT_WATCH_MAX_BACKOFF_S) -> None:
        if max_audit_rows < 1 or audit_bucket_rows < 1 or max_attempts < 1:
            raise ValueError("max_audit_rows, audit_bucket_rows and max_attempts must be >= 1")
        self.target = target
        self.prefix = validate_prefix(prefix)
        self.keys = Keys(self.prefix)
        self.request_timeout_s = request_timeout_s
        self.max_audit_rows = max_audit_rows
        self.audit_bucket_rows = audit_bucket_rows
        self.max_attempts = max_attempts
        self.watch_wait_s = watch_wait_s
        self.watch_max_backoff_s = watch_max_backoff_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self.conflicts = 0
        """Lost check-and-set races so far (each retried)."""

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "mesh", env: Mapping[str, str] | None = None,
                 **options: Any) -> ConsulStore:
        """The store on the Consul ``url`` names (``consul://HOST:PORT`` or
        ``consuls://``), token and TLS from ``env`` (default: this process's environment, as
        ``consul_conn.target_from_env`` reads it). Raises ``ConsulConfigError``. No I/O."""
        target = target_from_env(url, os.environ if env is None else env)
        return cls(target, prefix=prefix, **options)

    def describe(self) -> str:
        return f"Consul KV at {self.target.url} under {self.prefix}/"

    # ------------------------------------------------------------------ HTTP
    def _client(self) -> consul.Consul:
        client: consul.Consul | None = getattr(self._local, "client", None)
        if client is None:
            client = connect(self.target, self.request_timeout_s)
            self._local.client = client
        return client

    def _fail(self, what: str, exc: BaseException) -> StateError:
        line = " ".join(str(exc).split())[:300] or type(exc).__name__
        if str(exc).startswith("413"):
            return StateError(f"Consul at {self.target.url} refused {what} as too large "
                              f"(at most {KV_MAX_VALUE_BYTES // 1024} KiB a value or a "
                              f"transaction): {line}")
        if is_outage(exc):
            return StateError(f"Consul at {self.target.url} is unavailable ({what}): {line}")
        return StateError(f"Consul at {self.target.url} refused {what}: {line}")

    def _call(self, what: str, fn: Callable[[consul.Consul], T]) -> T:
        try:
            return fn(self._client())
        except StateError:
            raise
        except Exception as exc:
            raise self._fail(what, exc) from exc

    def _get(self, key: str) -> _Entry:
        """The entry at ``key`` (``modify_index`` 0 when absent; ``doc`` None when absent or
        unreadable)."""
        _, data = self._call(f"reading {key}", lambda c: c.kv.get(key))
        if not data:
            return _Entry(key, None, 0)
        return _Entry(key, decode(data.get("Value")), int(data.get("ModifyIndex") or 0))

    def _tree(self, prefix: str) -> list[_Entry]:
        """Every entry under ``prefix``, by key."""
        _, data = self._call(f"reading {prefix}", lambda c: c.kv.get(prefix, recurse=True))
        return [_Entry(d["Key"], decode(d.get("Value")), int(d.get("ModifyIndex") or 0))
                for d in data or []]

    def _keys(self, prefix: str, separator: str | None = None) -> list[str]:
        _, data = self._call(f"listing {prefix}",
                             lambda c: c.kv.get(prefix, keys=True, separator=separator))
        return [k for k in data or [] if isinstance(k, str)]

    def _cas_put(self, key: str, doc: Mapping[str, Any], index: int) -> bool:
        """Write ``doc`` at ``key`` if its ModifyIndex is still ``index`` (0: if absent)."""
        value = self._sized(key, doc)
        return bool(self._call(f"writing {key}", lambda c: c.kv.put(key, value, cas=index)))

    def _cas_delete(self, key: str, index: int) -> bool:
        return bool(self._call(f"deleting {key}", lambda c: c.kv.delete(key, cas=index)))

    @staticmethod
    def _sized(key: str, doc: Mapping[str, Any]) -> bytes:
        value = encode(doc)
        if len(value) > KV_MAX_VALUE_BYTES:
            raise StateError(f"{key}: {len(value)} bytes is more than Consul stores in one "
                             f"value ({KV_MAX_VALUE_BYTES})")
        return value

    def _txn(self, ops: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        """Run ``ops`` (at most ``TXN_MAX_OPS``) as one transaction: ``(True, results)``, or
        ``(False, errors)`` when Consul rolled it back (a check failed)."""
        if len(ops) > TXN_MAX_OPS:
            raise StateError(f"{len(ops)} operations is more than one Consul transaction takes "
                             f"({TXN_MAX_OPS})")
        body = json.dumps(ops)

        def call(c: consul.Consul) -> Any:
            return c.http.put(lambda r: r, "/v1/txn", data=body, headers=c.prepare_headers())

        response = self._call("a transaction", call)
        if response.code in (200, 409):
            try:
                answer = json.loads(response.body)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                if response.code == 200:
                    return True, list(answer.get("Results") or [])
                return False, list(answer.get("Errors") or [])
        raise self._fail("a transaction",
                         ConsulException(f"{response.code} {str(response.body)[:300]}"))

    def _read_many(self, keys: Sequence[str]) -> list[_Entry]:
        """The entries at ``keys`` (in order; absent ones left out), in read-only
        transactions of up to ``TXN_MAX_OPS`` gets (one GET per key for a batch in which a
        key has gone)."""
        out: list[_Entry] = []
        for batch in chunks(keys, TXN_MAX_OPS):
            ok, results = self._txn([kv_op("get", k) for k in batch])
            if not ok:
                out.extend(e for e in (self._get(k) for k in batch) if e.modify_index)
                continue
            for r in results:
                kv = r.get("KV") or {}
                raw = kv.get("Value")
                value = base64.b64decode(raw) if isinstance(raw, str) and raw else None
                out.append(_Entry(str(kv.get("Key")), decode(value),
                                  int(kv.get("ModifyIndex") or 0)))
        return out

    def _retry(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()`` until it does not raise ``_Conflict`` (a lost race: it read stale
        state), at most ``max_attempts`` times, sleeping a random 0..min(100 ms, 2 ms * 2^n)
        between tries. ``StateError`` after the last."""
        for n in range(self.max_attempts):
            try:
                return attempt()
            except _Conflict:
                with self._lock:
                    self.conflicts += 1
                time.sleep(random.uniform(0, min(MAX_RETRY_BACKOFF_S, 0.002 * 2 ** min(n, 16))))
        raise StateError(f"{what}: still losing races against other writers after "
                         f"{self.max_attempts} attempts")

    # ------------------------------------------------------------------ tokens
    def add_token(self, token_id: str, service: str, secret_digest: str, expires_at: float,
                  uses_left: int | None, created_at: float) -> TokenRow:
        row = TokenRow(token_id, service, secret_digest, expires_at, uses_left, created_at)
        if not self._cas_put(self.keys.token(token_id), token_doc(row), 0):
            raise DuplicateKey(f"a join token with id {token_id!r} exists")
        return row

    def get_token(self, token_id: str) -> TokenRow | None:
        return token_row(self._get(self.keys.token(token_id)).doc)

    def list_tokens(self) -> list[TokenRow]:
        rows = [r for r in (token_row(e.doc) for e in self._tree(self.keys.tokens())) if r]
        return sorted(rows, key=lambda r: (r.created_at, r.token_id))

    def delete_token(self, token_id: str) -> bool:
        key = self.keys.token(token_id)

        def attempt() -> bool:
            entry = self._get(key)
            if not entry.modify_index:
                return False
            if not self._cas_delete(key, entry.modify_index):
                raise _Conflict
            return True
        return self._retry(f"deleting join token {token_id}", attempt)

    def use_token(self, token_id: str, now: float) -> tuple[UseResult, TokenRow | None]:
        key = self.keys.token(token_id)

        def attempt() -> tuple[UseResult, TokenRow | None]:
            entry = self._get(key)
            tok = token_row(entry.doc)
            result, after = use_outcome(tok, now)
            if result is UseResult.OK and after is not None and tok is not None \
                    and after.uses_left != tok.uses_left:
                if not self._cas_put(key, token_doc(after), entry.modify_index):
                    raise _Conflict
            return result, after
        return self._retry(f"using join token {token_id}", attempt)

    def give_back_use(self, token_id: str) -> None:
        key = self.keys.token(token_id)

        def attempt() -> None:
            entry = self._get(key)
            tok = token_row(entry.doc)
            if tok is None or tok.uses_left is None:
                return
            back = TokenRow(tok.token_id, tok.service, tok.secret_digest, tok.expires_at,
                            tok.uses_left + 1, tok.created_at)
            if not self._cas_put(key, token_doc(back), entry.modify_index):
                raise _Conflict
        self._retry(f"giving back a use of join token {token_id}", attempt)

    # ------------------------------------------------------------------ certificates
    def record_certificate(self, serial: str, service: str, instance_id: str, spiffe_id: str,
                           not_after: float, issued_at: float,
                           token_id: str | None = None) -> None:
        row = CertRow(serial, service, instance_id, spiffe_id, not_after, issued_at)
        key = self.keys.cert(serial)
        value = self._sized(key, cert_doc(row, token_id))

        def attempt() -> None:
            old = self._get(key)
            ops = [kv_op("cas", key, value, old.modify_index),
                   kv_op("set", self.keys.cert_of(instance_id, serial), value)]
            before = cert_row(old.doc)
            if before is not None and before.instance_id != instance_id:
                ops.append(kv_op("delete", self.keys.cert_of(before.instance_id, serial)))
            ok, _ = self._txn(ops)
            if not ok:
                raise _Conflict
        self._retry(f"recording certificate {serial}", attempt)

    def list_certificates(self) -> list[CertRow]:
        rows = [r for r in (cert_row(e.doc) for e in self._tree(self.keys.certs())) if r]
        return sorted(rows, key=lambda r: (r.issued_at, r.serial))

    def get_certificate(self, serial: str) -> CertRow | None:
        return cert_row(self._get(self.keys.cert(serial)).doc)

    def _certs_of(self, instance_id: str) -> list[CertRow]:
        return [r for r in (cert_row(e.doc) for e in self._tree(self.keys.certs_of(instance_id)))
                if r is not None and r.instance_id == instance_id]

    def certificates_of_instance(self, instance_id: str, now: float,
                                 service: str | None = None) -> list[CertRow]:
        rows = [r for r in self._certs_of(instance_id)
                if r.not_after > now and (service is None or r.service == service)]
        return sorted(rows, key=lambda r: (r.issued_at, r.serial))

    # ------------------------------------------------------------------ revocation
    def revoke(self, serials: list[str], now: float, identity: str) -> list[str]:
        done: list[str] = []
        for batch in chunks(unique(serials), TXN_MAX_OPS):
            def attempt(batch: Sequence[str] = batch) -> list[str]:
                fresh = [s for s in batch
                         if self.get_certificate(s) is not None
                         and not self._get(self.keys.revoked(s)).modify_index]
                if fresh:
                    ok, _ = self._txn([kv_op("cas", self.keys.revoked(s), encode(
                        {"serial": s, "revoked_at": now, "identity": identity}), 0)
                        for s in fresh])
                    if not ok:
                        raise _Conflict
                return fresh
            done.extend(self._retry("revoking certificates", attempt))
        return done

    def _revoked(self) -> list[tuple[str, float, str]]:
        out: list[tuple[str, float, str]] = []
        under = self.keys.revocations()
        for e in self._tree(under):
            doc = e.doc or {}
            try:
                out.append((_text(doc["serial"]), float(doc["revoked_at"]),
                            _text(doc["identity"])))
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring the unreadable revocation at %s", e.key)
        return out

    def list_revoked(self) -> list[RevokedRow]:
        rows: list[RevokedRow] = []
        for serial, revoked_at, identity in self._revoked():
            c = self.get_certificate(serial)
            rows.append(RevokedRow(serial, revoked_at, identity, c.service if c else "",
                                   c.instance_id if c else "", c.not_after if c else 0.0))
        return sorted(rows, key=lambda r: (r.revoked_at, r.serial))

    def barred_instances(self) -> set[tuple[str, str]]:
        serials = [s for s, _, _ in self._revoked()]
        instances: set[str] = set()
        for serial in serials:
            c = self.get_certificate(serial)
            if c is not None and c.instance_id != "-":
                instances.add(c.instance_id)
        certs = [c for iid in sorted(instances) for c in self._certs_of(iid)]
        return barred_of(certs, serials)

    # ------------------------------------------------------------------ audit log
    def add_audit(self, row: AuditRow) -> None:
        cut = cut_audit(row)
        seq_key = self.keys.audit_seq()
        rows_per = self.audit_bucket_rows

        def attempt() -> None:
            counter = self._get(seq_key)
            seq = _int_field(counter.doc, "seq") + 1
            ops = [kv_op("cas", seq_key, encode({"seq": seq}), counter.modify_index),
                   kv_op("cas", self.keys.audit_row(seq, rows_per),
                         self._sized("audit row", audit_doc(cut, seq)), 0)]
            if seq % rows_per == 0:  # the counter entered a new bucket
                under = self.keys.audit_rows()
                buckets = [b for b in (last_segment_int(k, under)
                                       for k in self._keys(under, "/")) if b is not None]
                old = expired_buckets(buckets, seq, self.max_audit_rows, rows_per)
                ops.extend(kv_op("delete-tree", self.keys.audit_bucket(b))
                           for b in old[:TXN_MAX_OPS - len(ops)])
            ok, _ = self._txn(ops)
            if not ok:
                raise _Conflict
        self._retry("writing the audit log", attempt)

    def list_audit(self, limit: int, action: str = "") -> list[AuditRow]:
        if limit <= 0:
            return []
        floor = _int_field(self._get(self.keys.audit_seq()).doc, "seq") - self.max_audit_rows
        under = self.keys.audit_rows()
        buckets = sorted({b for b in (last_segment_int(k, under) for k in self._keys(under, "/"))
                          if b is not None}, reverse=True)
        out: list[AuditRow] = []
        for b in buckets:
            if (b + 1) * self.audit_bucket_rows - 1 <= floor:
                break
            entries = [x for x in (audit_entry(e.doc) for e in self._tree(self.keys.audit_bucket(b)))
                       if x is not None and x[0] > floor]
            for _, r in sorted(entries, key=lambda x: x[0], reverse=True):
                if action and r.action != action:
                    continue
                out.append(r)
                if len(out) >= limit:
                    return out
        return out

    # ------------------------------------------------------------------ snapshot versions
    def _snapshot_meta(self) -> tuple[_Entry, int, int, str]:
        entry = self._get(self.keys.snapshot())
        doc = entry.doc or {}
        digest = doc.get("hash")
        return (entry, _int_field(doc, "counter"), _int_field(doc, "version"),
                digest if isinstance(digest, str) else "")

    def published_snapshot(self) -> tuple[int, str]:
        _, _, version, digest = self._snapshot_meta()
        return (version, digest) if version else (0, "")

    def publish_snapshot(self, content_hash: str, force: bool = False) -> int:
        def attempt() -> int:
            entry, counter, version, digest = self._snapshot_meta()
            if version and digest == content_hash and not force:
                return version
            n = counter + 1
            if not self._cas_put(self.keys.snapshot(),
                                 {"counter": n, "version": n, "hash": content_hash},
                                 entry.modify_index):
                raise _Conflict
            return n
        return self._retry("numbering a snapshot", attempt)

    def take_version_number(self) -> int:
        def attempt() -> int:
            entry, counter, version, digest = self._snapshot_meta()
            n = counter + 1
            if not self._cas_put(self.keys.snapshot(),
                                 {"counter": n, "version": version, "hash": digest},
                                 entry.modify_index):
                raise _Conflict
            return n
        return self._retry("taking a version number", attempt)

    # ------------------------------------------------------------------ authorization
    def authz_default(self) -> str:
        value = (self._get(self.keys.authz()).doc or {}).get("action")
        return value if value in ("allow", "deny") else DEFAULT_AUTHZ

    def set_authz_default(self, action: str) -> None:
        check_authz_default(action)
        key = self.keys.authz()

        def attempt() -> None:
            if not self._cas_put(key, {"action": action}, self._get(key).modify_index):
                raise _Conflict
        self._retry("setting the authorization default", attempt)

    # ------------------------------------------------------------------ config revisions
    def config_latest(self) -> list[Revision]:
        keys = latest_revision_keys(self._keys(self.keys.config()), self.keys.config())
        rows = [r for r in (revision_row(e.doc) for e in self._read_many(keys)) if r]
        return sorted(rows, key=lambda r: (r.kind, r.name))

    def config_get(self, kind: str, name: str, revision: int) -> Revision | None:
        if revision < 1:
            return None
        row = revision_row(self._get(self.keys.config_revision(kind, name, revision)).doc)
        return row if row is not None and (row.kind, row.name) == (kind, name) else None

    def config_revisions(self, kind: str, name: str) -> list[int]:
        under = self.keys.config_object(kind, name)
        return sorted(n for n in (last_segment_int(k, under) for k in self._keys(under))
                      if n is not None)

    def config_save(self, changes: Sequence[ConfigChange], applied_at: float) -> list[int]:
        """All changes in one transaction (``cas`` index 0 on each new revision key); at most
        ``TXN_MAX_OPS`` changes (``StateError`` otherwise, nothing stored)."""
        if not changes:
            return []
        if len(changes) > TXN_MAX_OPS:
            raise StateError(f"one apply stored in Consul changes at most {TXN_MAX_OPS} objects "
                             f"(one transaction); this one changes {len(changes)}: split it")

        def attempt() -> list[int]:
            last: dict[tuple[str, str], int] = {}
            revisions: list[int] = []
            ops: list[dict[str, Any]] = []
            for kind, name, spec, deleted in changes:
                if (kind, name) not in last:
                    last[(kind, name)] = max(self.config_revisions(kind, name), default=0)
                last[(kind, name)] += 1
                revision = last[(kind, name)]
                key = self.keys.config_revision(kind, name, revision)
                ops.append(kv_op("cas", key, self._sized(key, revision_doc(
                    kind, name, revision, spec, applied_at, deleted)), 0))
                revisions.append(revision)
            ok, _ = self._txn(ops)
            if not ok:
                raise _Conflict
            return revisions
        return self._retry("saving config revisions", attempt)

    # ------------------------------------------------------------------ watch
    def watch(self, on_change: Callable[[str], None]) -> Callable[[], None]:
        stop = threading.Event()
        for topic, key, is_prefix in ((WATCH_CONFIG, self.keys.config(), True),
                                      (WATCH_AUTHZ, self.keys.authz(), False),
                                      (WATCH_REVOKED, self.keys.revocations(), True)):
            threading.Thread(target=self._watch_main, args=(topic, key, is_prefix, on_change,
                                                            stop),
                             name=f"consul-state-watch-{topic}", daemon=True).start()
        return stop.set

    def _watch_main(self, topic: str, key: str, is_prefix: bool,
                    on_change: Callable[[str], None], stop: threading.Event) -> None:
        client = connect(self.target, self.request_timeout_s)
        index = BlockingIndex()
        failures = 0
        seen: Any = _UNSEEN

        def fetch(i: int | None, w: str | None) -> tuple[Any, Any]:
            return client.kv.get(key, index=i, wait=w, keys=is_prefix)  # type: ignore[no-any-return]

        while not stop.is_set():
            try:
                data, news = blocking_get(fetch, index, self.watch_wait_s)
            except Exception as exc:
                if stop.is_set():
                    break
                failures += 1
                if failures == 1:
                    log.warning("watching %s in Consul at %s failed (retrying): %s", key,
                                self.target.url, self._fail(f"watching {key}", exc))
                stop.wait(min(self.watch_max_backoff_s, 0.1 * 2 ** min(failures, 10)))
                continue
            if failures:
                log.info("watching %s in Consul at %s works again", key, self.target.url)
                failures = 0
            if news and data != seen and not stop.is_set():
                seen = data
                try:
                    on_change(topic)
                except Exception:
                    log.exception("the %s watch's callback failed", topic)
            stop.wait(MIN_QUERY_INTERVAL_S)


_UNSEEN = object()


def _int_field(doc: Mapping[str, Any] | None, name: str) -> int:
    value = (doc or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def open_state_store(registry_spec: str, local: Store, prefix: str = "mesh") -> StateStore:
    """The state store for ``--registry``: ``local`` (the SQLite file) for ``embedded``, else
    a ``ConsulStore`` on that Consul under ``prefix`` (token and TLS from the environment).
    Raises ``ConsulConfigError`` for a bad URL. No I/O."""
    if registry_spec == "embedded":
        return local
    return ConsulStore.from_url(registry_spec, prefix=prefix)
