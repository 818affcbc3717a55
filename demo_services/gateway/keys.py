"""Key material for the gateway's bearer JWTs: verification keys from PEM files, JWKS
documents fetched over HTTP and refreshed (so an issuer can rotate its keys), and the demo's
own ES256 signing key.

Only public keys ever leave this module's loaders, except :func:`load_private_key` (used to
mint demo tokens). Nothing here logs key material or tokens.

Algorithms: RS256 (RSA, at least 2048 bits) and ES256 (EC P-256) only; anything else in a key
file or a JWKS document is skipped (JWKS) or refused (files).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")          # the only signature algorithms the gateway accepts
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 256 * 1024               # a JWKS document larger than this is refused
JWKS_FETCH_TIMEOUT_S = 5.0                # one fetch, connect to last byte
UNKNOWN_KID_MIN_INTERVAL_S = 5.0          # at most one fetch per this many seconds (capped by
                                          # the issuer's refresh period)
DEMO_PRIVATE_KEY = "demo-signing-key.pem"       # mode 0600
DEMO_PUBLIC_KEY = "demo-signing-key.pub.pem"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class VerifyKey:
    """One public key that may verify tokens signed with ``algorithm`` (RS256 or ES256).
    ``kid`` is the JWKS key id (None for key files and JWKS keys without one); ``source`` names
    where it came from, for logs (a path or a URL, never key material)."""

    kid: str | None
    algorithm: str
    key: PublicKey
    source: str


def algorithm_for(key: object) -> str | None:
    """The one algorithm ``key`` (public or private) may sign/verify with: RS256 for RSA of at
    least MIN_RSA_BITS bits, ES256 for EC P-256; None for anything else."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RS256" if key.key_size >= MIN_RSA_BITS else None
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ES256" if isinstance(key.curve, ec.SECP256R1) else None
    return None


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The RFC 7517 public JWK members of ``key`` (kty and its required members only)."""
    algorithm = algorithm_for(key)
    if algorithm == "RS256":
        return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    if algorithm == "ES256":
        return json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    raise ValueError("not an RS256 or ES256 public key")


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url without padding) of ``key``: a stable key id."""
    members = public_jwk(key)
    required = ("e", "kty", "n") if members["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: members[k] for k in required}, separators=(",", ":"),
                           sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def jwks_document(keys: Iterable[tuple[PublicKey, str | None]]) -> dict[str, Any]:
    """A JWKS document ``{"keys": [...]}`` publishing ``(public key, kid)`` pairs, each with
    ``use: sig`` and its ``alg``; a None kid becomes the key's thumbprint."""
    out = []
    for key, kid in keys:
        jwk = public_jwk(key)
        jwk.update(kid=kid or jwk_thumbprint(key), use="sig", alg=algorithm_for(key) or "")
        out.append(jwk)
    return {"keys": out}


# ---------------------------------------------------------------- key files

def expand_key_path(raw: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Path:
    """``raw`` with ``$MESH_DEMO_DIR`` / ``${MESH_DEMO_DIR}`` replaced by the demo dir (the
    variable, default ``.mesh``) and ``~`` expanded; relative paths stay relative to the working
    directory. Lets one static config name the demo key wherever the demo runs."""
    env = os.environ if env is None else env
    demo_dir = env.get("MESH_DEMO_DIR", "").strip() or ".mesh"
    text = os.fspath(raw).replace("${MESH_DEMO_DIR}", demo_dir).replace("$MESH_DEMO_DIR",
                                                                        demo_dir)
    return Path(text).expanduser()


def parse_public_pem(data: bytes, source: str) -> VerifyKey:
    """The verification key in PEM ``data``: a public key, a certificate, or a private key (its
    public half is kept). Raises ValueError "<source>: <reason>" (never quoting the data)."""
    key: object
    try:
        if b"CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        elif b"PRIVATE KEY-----" in data:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        kind = "an encrypted private key" if "encrypted" in str(e).lower() else "a PEM key"
        raise ValueError(f"{source}: not {kind} the gateway can use") from None
    algorithm = algorithm_for(key)
    if algorithm is None:
        raise ValueError(f"{source}: not an RSA (>= {MIN_RSA_BITS} bits) or EC P-256 key")
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return VerifyKey(kid=None, algorithm=algorithm, key=key, source=source)


def load_key_file(path: Path) -> VerifyKey:
    """The verification key in the PEM file ``path``; raises ValueError "<path>: <reason>"."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_public_pem(data, str(path))


def load_private_key(path: Path) -> PrivateKey:
    """The signing key in the (unencrypted) PEM file ``path``: RSA >= 2048 bits or EC P-256.
    Raises ValueError "<path>: <reason>"."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if algorithm_for(key) is None:
        raise ValueError(f"{path}: not an RSA (>= {MIN_RSA_BITS} bits) or EC P-256 key")
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


# ---------------------------------------------------------------- the demo's key

def demo_key_dir(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """Where the demo's signing key lives: ``$MESH_DEMO_DIR/gateway`` (default
    ``.mesh/gateway``), absolute (relative to ``cwd``, default the working directory)."""
    env = os.environ if env is None else env
    base = cwd or Path.cwd()
    return (base / (env.get("MESH_DEMO_DIR", "").strip() or ".mesh") / "gateway").resolve()


def _write_once(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` unless it already exists (a concurrent writer
    that got there first wins; its file is kept)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)              # os.open's mode went through the umask: set it exactly
        try:
            os.link(tmp, path)           # fails if the path exists: never overwrite a key
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def demo_keys(directory: Path) -> tuple[Path, Path]:
    """``(private key PEM, public key PEM)`` of the demo's ES256 signing key in ``directory``,
    created on first use (directory 0700, private key 0600, public key 0644). Safe to call from
    several processes at once: the first key written is the one everybody uses. An existing
    private key readable by others is narrowed to 0600."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private, public = directory / DEMO_PRIVATE_KEY, directory / DEMO_PUBLIC_KEY
    if not private.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        _write_once(private, pem, 0o600)
    if private.stat().st_mode & 0o077:
        os.chmod(private, 0o600)
    key = load_private_key(private)
    want = key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        current = public.read_bytes()
    except FileNotFoundError:
        current = None
    if current != want:                  # missing, or left over from an older private key
        if current is not None:
            public.unlink(missing_ok=True)
        _write_once(public, want, 0o644)
    return private, public


# ---------------------------------------------------------------- JWKS

def parse_jwks(data: bytes, source: str) -> tuple[VerifyKey, ...]:
    """The usable signature keys of a JWKS document: RS256/ES256 keys whose ``use`` (if any) is
    ``sig``; other keys (encryption keys, HS*, other curves, malformed entries) are skipped.
    Raises ValueError "<source>: <reason>" if ``data`` is not a JWKS document at all."""
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"{source}: JWKS document larger than {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{source}: not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{source}: not a JWKS document (no \"keys\" list)")
    keys: list[VerifyKey] = []
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        alg = entry.get("alg")
        if alg is not None and alg not in ALGORITHMS:
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        algorithm = algorithm_for(key)
        if algorithm is None or (alg is not None and alg != algorithm):
            continue
        keys.append(VerifyKey(kid=kid, algorithm=algorithm, key=key, source=source))
    return tuple(keys)


def jwks_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a JWKS URL, or None: https anywhere, plain http only to a loopback
    host (the key set decides who is authenticated, so it must not travel in the clear)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port                           # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "expected an http(s) URL with a host"
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            return "plain http only to a loopback host; use https"
    return None


Fetch = Callable[[str], Awaitable[bytes]]


class JwksSource:
    """The current keys of one JWKS URL, kept fresh.

    * The first :meth:`keys` call fetches the document (and starts the periodic refresh, every
      ``refresh_s`` seconds, in the running loop).
    * :meth:`refetch` (on a token whose ``kid`` is unknown) fetches at once, unless a fetch
      started less than ``min_interval_s`` ago (then the current keys are returned): a stream of
      tokens with made-up key ids costs the issuer at most one fetch per interval. Concurrent
      callers share one fetch.
    * A fetch that fails (network, status, size, not JWKS) keeps the last good keys and is
      logged as one line.
    """

    def __init__(self, url: str, refresh_s: float, *, min_interval_s: float | None = None,
                 fetch: Fetch | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.refresh_s = refresh_s
        self.min_interval_s = (min(UNKNOWN_KID_MIN_INTERVAL_S, refresh_s)
                               if min_interval_s is None else min_interval_s)
        self._fetch = fetch or self._http_fetch
        self._clock = clock
        self._keys: tuple[VerifyKey, ...] = ()
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self._session: Any = None             # aiohttp.ClientSession, made on first fetch
        self._closed = False
        self.fetches = 0                      # attempts, for tests and metrics
        self.failures = 0

    @property
    def current(self) -> tuple[VerifyKey, ...]:
        """The last good keys (empty before the first successful fetch)."""
        return self._keys

    async def keys(self) -> tuple[VerifyKey, ...]:
        """The current keys; the first call fetches them and starts the periodic refresh."""
        if self._refresher is None and not self._closed:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        if not self._keys and (self._last_attempt is None or self._lock.locked()):
            return await self.refetch()       # the first fetch (shared with whoever started it)
        return self._keys

    async def refetch(self) -> tuple[VerifyKey, ...]:
        """Fetch now if the last fetch started at least ``min_interval_s`` ago (one shared fetch
        for concurrent callers); the keys after that."""
        started_waiting = self._clock()
        async with self._lock:
            last = self._last_attempt
            if last is not None and (last >= started_waiting
                                     or self._clock() - last < self.min_interval_s):
                return self._keys             # somebody fetched meanwhile, or too soon
            await self._refresh()
        return self._keys

    async def _refresh(self) -> None:
        if self._closed:
            return
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            data = await asyncio.wait_for(self._fetch(self.url), JWKS_FETCH_TIMEOUT_S)
            keys = parse_jwks(data, self.url)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure keeps the last good keys
            self.failures += 1
            reason = str(e) or type(e).__name__
            log.warning("JWKS %s: fetch failed, keeping %d last good keys: %s",
                        self.url, len(self._keys), reason.splitlines()[0][:200])
            return
        if not keys:
            self.failures += 1
            log.warning("JWKS %s: no usable RS256/ES256 signature keys, keeping %d last good",
                        self.url, len(self._keys))
            return
        self._keys = keys

    async def _refresh_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.refresh_s)
            async with self._lock:
                await self._refresh()

    async def _http_fetch(self, url: str) -> bytes:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT_S),
                headers={"Accept": "application/json"})
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            data = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(data) > MAX_JWKS_BYTES:
                raise ValueError(f"JWKS document larger than {MAX_JWKS_BYTES} bytes")
            return data

    async def aclose(self) -> None:
        """Stop refreshing and close the HTTP session; the current keys stay readable."""
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001
                pass
            self._refresher = None
        if self._session is not None:
            await self._session.close()
            self._session = None
