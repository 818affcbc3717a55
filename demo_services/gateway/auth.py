"""Bearer-JWT authentication for the gateway.

A request carries ``Authorization: Bearer <JWT>``. :class:`Authenticator` accepts it when

* the token's ``alg`` is RS256 or ES256 and one the issuer allows (never ``none``, never HS*:
  a shared secret would let anyone who can verify also mint);
* its ``iss`` is one of the configured issuers, exactly;
* its signature verifies with one of that issuer's keys: by ``kid`` from its JWKS document
  (refetched at once, rate-limited, when the kid is unknown, so a rotated key works at once),
  else any of its key files;
* ``exp`` is present and not past, ``nbf`` and ``iat`` (if present) not in the future, each
  with ``leeway_s`` seconds of clock skew allowed; ``aud`` names one of the issuer's audiences;
  ``sub`` is a non-empty printable ASCII string of at most 256 characters (it goes to the
  services as gRPC metadata).

Anything else raises :class:`AuthError` whose ``reason`` is one line for the 401 body. The
signature is checked before the time and audience claims, so those reasons are only ever told
about authentic tokens. Tokens and keys are never logged.

The pure parts (header parsing, claim checks, config parsing) do no I/O and are tested
directly; ``python -m demo_services.gateway token SUBJECT [--ttl S]`` ends in :func:`token_main`.
"""

from __future__ import annotations

import math
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from demo_services.gateway.keys import (
    ALGORITHMS,
    JwksSource,
    VerifyKey,
    algorithm_for,
    demo_key_dir,
    demo_keys,
    expand_key_path,
    jwk_thumbprint,
    jwks_url_problem,
    load_key_file,
    load_private_key,
)
from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.numbers import finite_arg

__all__ = [
    "ALGORITHMS", "DEMO_AUDIENCE", "DEMO_ISSUER", "AuthError", "Authenticator", "IssuerConfig",
    "Principal", "check_claims", "demo_key_dir", "demo_keys", "mint_token", "parse_bearer",
    "parse_issuers", "token_main",
]

DEMO_ISSUER = "https://demo.mesh.local"
DEMO_AUDIENCE = "mesh-demo-gateway"
DEFAULT_JWKS_REFRESH_S = 300.0
MAX_JWKS_REFRESH_S = 86400.0
MAX_TOKEN_BYTES = 8192                 # a longer Authorization value is refused unparsed
MAX_SUBJECT_CHARS = 256
DEFAULT_TOKEN_TTL_S = 3600.0
MAX_TOKEN_TTL_S = 30 * 86400.0

_BEARER = re.compile(r"Bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
_JWS_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_SUBJECT = re.compile(r"[\x20-\x7e]+")


class AuthError(Exception):
    """A request that is not authenticated; ``reason`` is one line for the 401 body (never
    the token, never key material)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for: its ``sub``, its ``iss`` and all its claims."""

    subject: str
    issuer: str
    claims: dict


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted token issuer.

    ``issuer`` is matched exactly against ``iss``; a token's ``aud`` must name one of
    ``audiences``. Keys come from ``key_files`` (PEM: public key, certificate or private key;
    ``$MESH_DEMO_DIR`` expands, see keys.expand_key_path) and/or the JWKS document at
    ``jwks_url``, refetched every ``jwks_refresh_s`` seconds. ``algorithms`` is a non-empty
    subset of RS256 and ES256.
    """

    issuer: str
    audiences: tuple[str, ...]
    key_files: tuple[Path, ...]
    jwks_url: str | None
    jwks_refresh_s: float
    algorithms: tuple[str, ...]


# ---------------------------------------------------------------- pure checks

def parse_bearer(authorization_header: str | None) -> str:
    """The compact JWS in ``Authorization: Bearer <token>`` (scheme case-insensitive).
    Raises AuthError "missing bearer token" (no header, empty, another scheme) or
    "malformed token" (not three base64url segments, or longer than MAX_TOKEN_BYTES)."""
    if authorization_header is None or not authorization_header.strip():
        raise AuthError("missing bearer token")
    if len(authorization_header) > MAX_TOKEN_BYTES:
        raise AuthError("malformed token")
    match = _BEARER.fullmatch(authorization_header.strip())
    if match is None:
        if authorization_header.strip().lower() == "bearer":
            raise AuthError("missing bearer token")
        scheme = authorization_header.strip().split(None, 1)[0]
        if scheme.lower() != "bearer":
            raise AuthError("missing bearer token")
        raise AuthError("malformed token")
    token = match.group(1)
    if _JWS_COMPACT.fullmatch(token) is None:
        raise AuthError("malformed token")
    return token


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"malformed token: {name} is not a number")
    return float(value)


def check_claims(claims: Mapping[str, Any], issuer: IssuerConfig, now: float,
                 leeway_s: float) -> Principal:
    """The principal of a token whose signature is already verified, if its claims hold at
    ``now`` (Unix seconds) with ``leeway_s`` seconds of skew: ``iss`` equals the issuer, ``exp``
    present and ``now <= exp + leeway``, ``nbf``/``iat`` (if present) ``<= now + leeway``,
    ``aud`` (a string or a list) names one of the issuer's audiences, ``sub`` a printable ASCII
    string of 1..256 characters. Raises AuthError with the first claim that fails."""
    if claims.get("iss") != issuer.issuer:
        raise AuthError("wrong issuer")
    exp = _number(claims, "exp")
    if exp is None:
        raise AuthError("token has no expiry")
    if now > exp + leeway_s:
        raise AuthError("token expired")
    for name in ("nbf", "iat"):
        when = _number(claims, name)
        if when is not None and when > now + leeway_s:
            raise AuthError("token not yet valid")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in issuer.audiences for a in audiences):
        raise AuthError("wrong audience")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("token has no subject")
    if len(sub) > MAX_SUBJECT_CHARS or _SUBJECT.fullmatch(sub) is None:
        raise AuthError("token subject is not printable ASCII of at most 256 characters")
    return Principal(subject=sub, issuer=issuer.issuer, claims=dict(claims))


# ---------------------------------------------------------------- config

_FIELDS = {"issuer", "audiences", "keys", "jwks_url", "jwks_refresh_s", "algorithms"}


def _strings(value: Any, field: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ValueError(f"{field}: expected a list of strings")
    if not value and not allow_empty:
        raise ValueError(f"{field}: must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{field}[{i}]: expected a non-empty string")
    return tuple(value)


def _one_issuer(doc: Any, where: str) -> IssuerConfig:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping")
    unknown = sorted(str(k) for k in doc if k not in _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} "
                         f"(expected {', '.join(sorted(_FIELDS))})")
    issuer = doc.get("issuer")
    if not isinstance(issuer, str) or not issuer.strip():
        raise ValueError(f"{where}.issuer: expected a non-empty string")
    audiences = _strings(doc.get("audiences"), f"{where}.audiences")
    raw_keys = doc.get("keys")
    key_files = () if raw_keys is None else _strings(raw_keys, f"{where}.keys",
                                                      allow_empty=True)
    jwks_url = doc.get("jwks_url")
    if jwks_url is not None:
        if not isinstance(jwks_url, str):
            raise ValueError(f"{where}.jwks_url: expected a URL string")
        problem = jwks_url_problem(jwks_url)
        if problem:
            raise ValueError(f"{where}.jwks_url: {problem}")
    if not key_files and jwks_url is None:
        raise ValueError(f"{where}: needs keys (PEM files) or jwks_url")
    refresh = doc.get("jwks_refresh_s", DEFAULT_JWKS_REFRESH_S)
    if (isinstance(refresh, bool) or not isinstance(refresh, int | float)
            or not 0 < refresh <= MAX_JWKS_REFRESH_S):
        raise ValueError(f"{where}.jwks_refresh_s: expected seconds in (0, "
                         f"{MAX_JWKS_REFRESH_S:g}], got {refresh!r}")
    algorithms = _strings(doc.get("algorithms", list(ALGORITHMS)), f"{where}.algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in ALGORITHMS:
            raise ValueError(f"{where}.algorithms[{i}]: {alg!r} not allowed "
                             f"(only {', '.join(ALGORITHMS)})")
    return IssuerConfig(issuer=issuer, audiences=audiences,
                        key_files=tuple(Path(k) for k in key_files), jwks_url=jwks_url,
                        jwks_refresh_s=float(refresh),
                        algorithms=tuple(dict.fromkeys(algorithms)))


def parse_issuers(doc: Any, where: str) -> tuple[IssuerConfig, ...]:
    """The issuers of a config document, validated whole, without I/O (key files are read by
    :class:`Authenticator`).

    ``doc`` is the ``issuers`` list (``where`` names it, e.g. ``"issuers"``) or a mapping that
    holds one under ``issuers``; None is no issuers. Each item: ``issuer`` (string),
    ``audiences`` (non-empty list), ``keys`` (list of PEM paths) and/or ``jwks_url`` (https, or
    http to loopback), ``jwks_refresh_s`` (default 300), ``algorithms`` (subset of RS256,
    ES256; default both). Raises ValueError "<field>: <reason>", e.g.
    ``issuers[0].algorithms[0]: 'HS256' not allowed (only RS256, ES256)``.
    """
    if isinstance(doc, dict) and "issuers" in doc:
        where = f"{where}.issuers" if where else "issuers"
        doc = doc["issuers"]
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise ValueError(f"{where}: expected a list of issuers")
    issuers = tuple(_one_issuer(item, f"{where}[{i}]") for i, item in enumerate(doc))
    seen: set[str] = set()
    for i, item in enumerate(issuers):
        if item.issuer in seen:
            raise ValueError(f"{where}[{i}].issuer: {item.issuer!r} listed twice")
        seen.add(item.issuer)
    return issuers


# ---------------------------------------------------------------- the authenticator

_SIGNATURE_ONLY = {"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                   "verify_iat": False, "verify_aud": False, "verify_iss": False,
                   "verify_sub": False, "verify_jti": False, "require": []}


@dataclass
class _Issuer:
    config: IssuerConfig
    files: tuple[VerifyKey, ...]
    jwks: JwksSource | None


class Authenticator:
    """Checks bearer JWTs against ``issuers`` (see the module docstring for what holds).

    ``clock`` gives Unix seconds for ``exp``/``nbf``/``iat``; ``leeway_s`` is the clock skew
    allowed on each. Key files are read here: an unreadable file, a key that is not RS256/ES256
    or one whose algorithm the issuer does not allow raises ValueError "<path>: <reason>" (so a
    config reload can refuse it). JWKS documents are fetched on first use, in the running loop;
    call :meth:`aclose` when replacing or dropping the authenticator.
    """

    def __init__(self, issuers: tuple[IssuerConfig, ...],
                 clock: Callable[[], float] = time.time, leeway_s: float = 30) -> None:
        if not 0 <= leeway_s < 3600:
            raise ValueError(f"leeway_s: expected seconds in [0, 3600), got {leeway_s!r}")
        self._clock = clock
        self._leeway_s = float(leeway_s)
        self._issuers: dict[str, _Issuer] = {}
        for config in issuers:
            if config.issuer in self._issuers:
                raise ValueError(f"issuer {config.issuer!r} listed twice")
            files = []
            for path in config.key_files:
                key = load_key_file(expand_key_path(path))
                if key.algorithm not in config.algorithms:
                    raise ValueError(f"{key.source}: a {key.algorithm} key, but issuer "
                                     f"{config.issuer!r} allows only "
                                     f"{', '.join(config.algorithms)}")
                files.append(key)
            jwks = (JwksSource(config.jwks_url, config.jwks_refresh_s)
                    if config.jwks_url else None)
            self._issuers[config.issuer] = _Issuer(config, tuple(files), jwks)

    @property
    def issuers(self) -> tuple[str, ...]:
        """The configured issuer names."""
        return tuple(self._issuers)

    def jwks_source(self, issuer: str) -> JwksSource | None:
        """The JWKS source of ``issuer`` (for metrics and tests), or None."""
        state = self._issuers.get(issuer)
        return state.jwks if state else None

    async def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal of the request's bearer token; raises AuthError with the reason."""
        token = parse_bearer(authorization_header)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise AuthError("algorithm not allowed")
        if "crit" in header:
            raise AuthError("malformed token: unsupported critical header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token")
        iss = unverified.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise AuthError("wrong issuer")
        if alg not in state.config.algorithms:
            raise AuthError("algorithm not allowed")
        candidates = await self._candidates(state, alg, kid)
        claims = self._verify(token, alg, candidates)
        return check_claims(claims, state.config, self._clock(), self._leeway_s)

    async def _candidates(self, state: _Issuer, alg: str, kid: str | None) -> list[VerifyKey]:
        """The keys worth trying: with a kid, the JWKS key of that kid (refetching the
        document once, rate-limited, if unknown), else the key files; without, every key."""
        files = [k for k in state.files if k.algorithm == alg]
        if state.jwks is None:
            if not files:
                raise AuthError("no key for this algorithm")
            return files
        jwks = [k for k in await state.jwks.keys() if k.algorithm == alg]
        if kid is None:
            candidates = jwks + files
        else:
            candidates = [k for k in jwks if k.kid == kid]
            if not candidates:
                jwks = [k for k in await state.jwks.refetch() if k.algorithm == alg]
                candidates = [k for k in jwks if k.kid == kid] or files
        if not candidates:
            raise AuthError("unknown key id" if kid is not None else "no key for this algorithm")
        return candidates

    @staticmethod
    def _verify(token: str, alg: str, candidates: Sequence[VerifyKey]) -> dict[str, Any]:
        for key in candidates:
            try:
                return jwt.decode(token, key.key, algorithms=[alg], options=_SIGNATURE_ONLY)
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError:
                raise AuthError("malformed token") from None
        raise AuthError("bad signature")

    async def aclose(self) -> None:
        """Stop the JWKS refreshes and close their HTTP sessions."""
        for state in self._issuers.values():
            if state.jwks is not None:
                await state.jwks.aclose()


# ---------------------------------------------------------------- minting (demo)

def mint_token(subject: str, ttl_s: float, key_file: Path, issuer: str, audience: str,
               kid: str | None = None) -> str:
    """A compact JWT for ``subject`` valid from now for ``ttl_s`` seconds (0 < ttl <= 30 days),
    signed with the private key in ``key_file`` (ES256 for EC P-256, RS256 for RSA), with
    ``iss``, ``aud``, ``sub``, ``iat``, ``nbf``, ``exp`` and a random ``jti``; ``kid`` goes in
    the header when given. Raises ValueError on a bad argument or key."""
    if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_CHARS \
            or _SUBJECT.fullmatch(subject) is None:
        raise ValueError("subject: expected printable ASCII of 1..256 characters")
    if not math.isfinite(ttl_s) or not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise ValueError(f"ttl: expected seconds in (0, {MAX_TOKEN_TTL_S:.0f}] (30 days), "
                         f"got {ttl_s!r}")
    key = load_private_key(key_file)
    algorithm = algorithm_for(key)
    now = int(time.time())
    claims = {"iss": issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now,
              "exp": now + max(1, math.ceil(ttl_s)), "jti": secrets.token_urlsafe(12)}
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def demo_kid(public_key_file: Path) -> str:
    """The demo key's id: the RFC 7638 thumbprint of the public key in ``public_key_file``."""
    return jwk_thumbprint(load_key_file(public_key_file).key)


def token_main(argv: Sequence[str]) -> int:
    """``python -m demo_services.gateway token SUBJECT [--ttl S]``: print a demo token for
    SUBJECT (issuer DEMO_ISSUER, audience DEMO_AUDIENCE), signed with the demo key in
    ``$MESH_DEMO_DIR/gateway`` (created on first use). ``argv`` is what follows ``token`` (a
    leading ``token`` followed by more arguments is skipped too). Returns the exit status: 0,
    1 with one line on stderr on failure, 2 on a usage error."""
    args = list(argv)
    if len(args) > 1 and args[0] == "token":
        args = args[1:]
    parser = OneLineArgumentParser(
        prog="python -m demo_services.gateway token",
        description="Mint a bearer JWT for the demo gateway, signed with the demo's key "
                    "($MESH_DEMO_DIR/gateway, default .mesh/gateway).")
    parser.add_argument("subject", help="the token's sub (who the requests are from)")
    parser.add_argument("--ttl", type=finite_arg, default=DEFAULT_TOKEN_TTL_S, metavar="S",
                        help=f"lifetime in seconds (default {DEFAULT_TOKEN_TTL_S:g})")
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        private, public = demo_keys(demo_key_dir())
        token = mint_token(ns.subject, ns.ttl, private, DEMO_ISSUER, DEMO_AUDIENCE,
                           kid=demo_kid(public))
    except (OSError, ValueError) as e:
        print(f"token: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0
