"""The gateway's bearer-JWT checks, without the network: header parsing, claim checks at a
fixed clock, the issuer config parser, Authenticator with key files (RS256 and ES256; expired,
wrong issuer, wrong audience, bad signature, not yet valid, alg none/HS256 refused), JWKS
parsing and the JWKS source's refetch rules with a stand-in fetch, the demo key and the
``token`` command. The JWKS rotation over real HTTP is in tests/integration/test_gateway_auth.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from demo_services.gateway import auth, keys
from demo_services.gateway.auth import (
    DEMO_AUDIENCE,
    DEMO_ISSUER,
    Authenticator,
    AuthError,
    IssuerConfig,
    check_claims,
    mint_token,
    parse_bearer,
    parse_issuers,
    token_main,
)

pytestmark = pytest.mark.timeout(30)

NOW = 1_700_000_000.0
ISS = "https://issuer.test"
AUD = "gateway-test"


def clock() -> float:
    return NOW


def pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory, ec_key: Any, rsa_key: Any) -> Path:
    d = tmp_path_factory.mktemp("keys")
    (d / "ec.pem").write_bytes(pem_private(ec_key))
    (d / "ec.pub.pem").write_bytes(pem_public(ec_key))
    (d / "rsa.pem").write_bytes(pem_private(rsa_key))
    (d / "rsa.pub.pem").write_bytes(pem_public(rsa_key))
    return d


def claims(**over: Any) -> dict[str, Any]:
    base = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(NOW) - 10,
            "nbf": int(NOW) - 10, "exp": int(NOW) + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def issuer_config(key_files: tuple[Path, ...], **over: Any) -> IssuerConfig:
    values = dict(issuer=ISS, audiences=(AUD,), key_files=key_files, jwks_url=None,
                  jwks_refresh_s=300.0, algorithms=("RS256", "ES256"))
    values.update(over)
    return IssuerConfig(**values)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# ---------------------------------------------------------------- the Authorization header

@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Basic dXNlcjpwYXNz",
                                    "Token a.b.c"])
def test_missing_bearer_token(header: str | None) -> None:
    with pytest.raises(AuthError) as e:
        parse_bearer(header)
    assert e.value.reason == "missing bearer token"


@pytest.mark.parametrize("header", ["Bearer a.b", "Bearer a.b.c.d", "Bearer a.b.c d",
                                    "Bearer a.b!.c", "Bearer " + "a" * 9000 + ".b.c"])
def test_malformed_bearer_token(header: str) -> None:
    with pytest.raises(AuthError) as e:
        parse_bearer(header)
    assert e.value.reason == "malformed token"


def test_bearer_scheme_is_case_insensitive() -> None:
    assert parse_bearer("bearer  aa.bb.cc ") == "aa.bb.cc"
    assert parse_bearer("BEARER aa.bb.cc") == "aa.bb.cc"


# ---------------------------------------------------------------- claim checks (pure)

CFG = issuer_config(())


def test_claims_accepted() -> None:
    p = check_claims(claims(), CFG, NOW, 30)
    assert (p.subject, p.issuer, p.claims["aud"]) == ("alice", ISS, AUD)


def test_expiry_with_leeway() -> None:
    check_claims(claims(exp=int(NOW) - 20), CFG, NOW, 30)            # within the leeway
    with pytest.raises(AuthError, match="token expired"):
        check_claims(claims(exp=int(NOW) - 31), CFG, NOW, 30)
    with pytest.raises(AuthError, match="token has no expiry"):
        check_claims(claims(exp=None), CFG, NOW, 30)


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_not_yet_valid_with_leeway(name: str) -> None:
    check_claims(claims(**{name: int(NOW) + 20}), CFG, NOW, 30)
    with pytest.raises(AuthError, match="token not yet valid"):
        check_claims(claims(**{name: int(NOW) + 31}), CFG, NOW, 30)


@pytest.mark.parametrize("aud", ["other", ["other", "x"], None, 7, [7]])
def test_claims_wrong_audience(aud: Any) -> None:
    with pytest.raises(AuthError, match="wrong audience"):
        check_claims(claims(aud=aud), CFG, NOW, 30)


def test_audience_list_naming_ours() -> None:
    assert check_claims(claims(aud=["other", AUD]), CFG, NOW, 0).subject == "alice"


def test_wrong_issuer_claim() -> None:
    with pytest.raises(AuthError, match="wrong issuer"):
        check_claims(claims(iss="https://evil.test"), CFG, NOW, 30)


@pytest.mark.parametrize("sub", [None, "", 5, "a\nb", "ü", "x" * 257])
def test_bad_subject(sub: Any) -> None:
    with pytest.raises(AuthError, match="subject"):
        check_claims(claims(sub=sub), CFG, NOW, 30)


@pytest.mark.parametrize("exp", ["soon", True, float("inf")])
def test_times_must_be_numbers(exp: Any) -> None:
    with pytest.raises(AuthError, match="malformed token"):
        check_claims(claims(exp=exp), CFG, NOW, 30)


# ---------------------------------------------------------------- config

def test_parse_issuers_defaults_and_values() -> None:
    doc = [{"issuer": ISS, "audiences": [AUD], "keys": ["$MESH_DEMO_DIR/gateway/k.pem"]},
           {"issuer": "https://idp.test", "audiences": ["a", "b"],
            "jwks_url": "https://idp.test/.well-known/jwks.json", "jwks_refresh_s": 60,
            "algorithms": ["RS256"]}]
    first, second = parse_issuers(doc, "issuers")
    assert first == IssuerConfig(ISS, (AUD,), (Path("$MESH_DEMO_DIR/gateway/k.pem"),), None,
                                 300.0, ("RS256", "ES256"))
    assert second.jwks_url and second.jwks_refresh_s == 60.0 and second.algorithms == ("RS256",)
    assert second.key_files == ()
    # a mapping holding the list, and no issuers at all
    assert parse_issuers({"issuers": doc}, "gateway.yaml") == (first, second)
    assert parse_issuers(None, "issuers") == ()


@pytest.mark.parametrize("item, message", [
    ({"issuer": ISS, "audiences": [AUD], "keys": ["k"], "algorithms": ["HS256"]},
     "issuers[0].algorithms[0]: 'HS256' not allowed (only RS256, ES256)"),
    ({"issuer": ISS, "audiences": [AUD], "keys": ["k"], "algorithms": ["none"]},
     "issuers[0].algorithms[0]: 'none' not allowed"),
    ({"issuer": ISS, "audiences": [AUD], "keys": ["k"], "algorithms": []},
     "issuers[0].algorithms: must not be empty"),
    ({"issuer": ISS, "audiences": [], "keys": ["k"]}, "issuers[0].audiences: must not be empty"),
    ({"issuer": ISS, "audiences": AUD, "keys": ["k"]},
     "issuers[0].audiences: expected a list of strings"),
    ({"audiences": [AUD], "keys": ["k"]}, "issuers[0].issuer: expected a non-empty string"),
    ({"issuer": ISS, "audiences": [AUD]}, "issuers[0]: needs keys (PEM files) or jwks_url"),
    ({"issuer": ISS, "audiences": [AUD], "keys": [""]}, "issuers[0].keys[0]: expected a"),
    ({"issuer": ISS, "audiences": [AUD], "jwks_url": "http://idp.example.com/jwks"},
     "issuers[0].jwks_url: plain http only to a loopback host"),
    ({"issuer": ISS, "audiences": [AUD], "jwks_url": "ftp://127.0.0.1/jwks"},
     "issuers[0].jwks_url: expected an http(s) URL"),
    ({"issuer": ISS, "audiences": [AUD], "keys": ["k"], "jwks_refresh_s": 0},
     "issuers[0].jwks_refresh_s: expected seconds"),
    ({"issuer": ISS, "audiences": [AUD], "keys": ["k"], "jwks_refresh_s": True},
     "issuers[0].jwks_refresh_s: expected seconds"),
    ({"issuer": ISS, "audience": [AUD], "keys": ["k"]}, "issuers[0]: unknown field 'audience'"),
    ("just a string", "issuers[0]: expected a mapping"),
])
def test_parse_issuers_refuses(item: Any, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_issuers([item], "issuers")
    assert str(e.value).startswith(message)


def test_parse_issuers_refuses_duplicates_and_non_lists() -> None:
    one = {"issuer": ISS, "audiences": [AUD], "keys": ["k"]}
    with pytest.raises(ValueError, match=r"issuers\[1\].issuer: .* listed twice"):
        parse_issuers([one, dict(one)], "issuers")
    with pytest.raises(ValueError, match="issuers: expected a list of issuers"):
        parse_issuers(one, "issuers")


def test_loopback_http_jwks_is_allowed() -> None:
    for url in ("http://127.0.0.1:9/jwks", "http://localhost/jwks", "http://[::1]:80/k"):
        assert parse_issuers([{"issuer": ISS, "audiences": [AUD], "jwks_url": url}], "i")


def test_authenticator_reads_and_checks_key_files(keydir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.pem: cannot read"):
        Authenticator((issuer_config((keydir / "missing.pem",)),))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="junk.pem: not a PEM key"):
        Authenticator((issuer_config((tmp_path / "junk.pem",)),))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "small.pem").write_bytes(pem_public(small))
    with pytest.raises(ValueError, match="small.pem: not an RSA"):
        Authenticator((issuer_config((tmp_path / "small.pem",)),))
    with pytest.raises(ValueError, match="a RS256 key, but issuer .* allows only ES256"):
        Authenticator((issuer_config((keydir / "rsa.pub.pem",), algorithms=("ES256",)),))
    # private keys and public keys both load (the public half is kept)
    Authenticator((issuer_config((keydir / "ec.pem", keydir / "rsa.pub.pem")),))


# ---------------------------------------------------------------- Authenticator, key files

@pytest.fixture
def authn(keydir: Path) -> Authenticator:
    return Authenticator((issuer_config((keydir / "ec.pub.pem", keydir / "rsa.pub.pem")),),
                         clock=clock, leeway_s=30)


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_accepted(authn: Authenticator, alg: str, ec_key: Any, rsa_key: Any) -> None:
    key = ec_key if alg == "ES256" else rsa_key
    token = jwt.encode(claims(sub="bob"), key, algorithm=alg)
    principal = await authn.authenticate(bearer(token))
    assert principal.subject == "bob" and principal.issuer == ISS
    assert principal.claims["exp"] == int(NOW) + 300


async def expect(authn: Authenticator, header: str | None, reason: str) -> None:
    with pytest.raises(AuthError) as e:
        await authn.authenticate(header)
    assert e.value.reason == reason
    assert "\n" not in e.value.reason


async def test_expired(authn: Authenticator, ec_key: Any) -> None:
    await expect(authn, bearer(jwt.encode(claims(exp=int(NOW) - 60), ec_key, "ES256")),
                 "token expired")


async def test_not_yet_valid(authn: Authenticator, ec_key: Any) -> None:
    await expect(authn, bearer(jwt.encode(claims(nbf=int(NOW) + 60), ec_key, "ES256")),
                 "token not yet valid")


async def test_wrong_issuer(authn: Authenticator, ec_key: Any) -> None:
    await expect(authn, bearer(jwt.encode(claims(iss="https://evil.test"), ec_key, "ES256")),
                 "wrong issuer")
    await expect(authn, bearer(jwt.encode(claims(iss=None), ec_key, "ES256")), "wrong issuer")


async def test_wrong_audience(authn: Authenticator, rsa_key: Any) -> None:
    await expect(authn, bearer(jwt.encode(claims(aud="someone-else"), rsa_key, "RS256")),
                 "wrong audience")


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_bad_signature(authn: Authenticator, alg: str) -> None:
    other = (ec.generate_private_key(ec.SECP256R1()) if alg == "ES256"
             else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    await expect(authn, bearer(jwt.encode(claims(), other, alg)), "bad signature")


async def test_tampered_payload_is_a_bad_signature(authn: Authenticator, ec_key: Any) -> None:
    header, _, signature = jwt.encode(claims(), ec_key, "ES256").split(".")
    forged = ".".join([header, b64(claims(sub="admin")), signature])
    await expect(authn, bearer(forged), "bad signature")


async def test_alg_none_refused(authn: Authenticator) -> None:
    token = ".".join([b64({"alg": "none", "typ": "JWT"}), b64(claims()), "c2ln"])
    await expect(authn, bearer(token), "algorithm not allowed")


async def test_hs256_refused_even_keyed_with_the_public_key(authn: Authenticator,
                                                            keydir: Path) -> None:
    # the classic confusion attack: HMAC "signed" with the verifier's public PEM
    secret = (keydir / "rsa.pub.pem").read_bytes()
    header = b64({"alg": "HS256", "typ": "JWT"})
    body = b64(claims())
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    token = f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    await expect(authn, bearer(token), "algorithm not allowed")
    await expect(authn, bearer(jwt.encode(claims(), "a-shared-secret-of-32-bytes!!!!!",
                                          "HS256")), "algorithm not allowed")


async def test_algorithm_the_issuer_does_not_allow(keydir: Path, rsa_key: Any) -> None:
    only_es = Authenticator((issuer_config((keydir / "ec.pub.pem",), algorithms=("ES256",)),),
                            clock=clock)
    await expect(only_es, bearer(jwt.encode(claims(), rsa_key, "RS256")),
                 "algorithm not allowed")


async def test_no_file_key_for_the_algorithm(keydir: Path, rsa_key: Any) -> None:
    only_ec_file = Authenticator((issuer_config((keydir / "ec.pub.pem",)),), clock=clock)
    await expect(only_ec_file, bearer(jwt.encode(claims(), rsa_key, "RS256")),
                 "no key for this algorithm")


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz"])
async def test_missing_header(authn: Authenticator, header: str | None) -> None:
    await expect(authn, header, "missing bearer token")


@pytest.mark.parametrize("token", ["abc.def.ghi", "e30.e30.e30",
                                   b64({"alg": "ES256"}) + ".bm90LWpzb24.c2ln",
                                   b64({"alg": "ES256"}) + "." + b64({"iss": ISS})[:-1] + ".x"])
async def test_malformed(authn: Authenticator, token: str) -> None:
    with pytest.raises(AuthError) as e:
        await authn.authenticate(bearer(token))
    assert e.value.reason.startswith(("malformed token", "algorithm not allowed",
                                      "wrong issuer"))


async def test_critical_header_refused(authn: Authenticator, ec_key: Any) -> None:
    token = jwt.encode(claims(), ec_key, "ES256", headers={"crit": ["exp"]})
    with pytest.raises(AuthError) as e:
        await authn.authenticate(bearer(token))
    assert e.value.reason.startswith("malformed token")


async def test_kid_ignored_for_key_files(authn: Authenticator, ec_key: Any) -> None:
    token = jwt.encode(claims(), ec_key, "ES256", headers={"kid": "whatever"})
    assert (await authn.authenticate(bearer(token))).subject == "alice"


async def test_two_issuers_keep_their_keys_apart(keydir: Path, ec_key: Any) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    (keydir / "other.pub.pem").write_bytes(pem_public(other_key))
    a = Authenticator((issuer_config((keydir / "ec.pub.pem",)),
                       issuer_config((keydir / "other.pub.pem",), issuer="https://b.test",
                                     audiences=("b",))), clock=clock)
    # a token claiming issuer b, signed with issuer a's key, is refused
    await expect(a, bearer(jwt.encode(claims(iss="https://b.test", aud="b"), ec_key, "ES256")),
                 "bad signature")
    ok = jwt.encode(claims(iss="https://b.test", aud="b"), other_key, "ES256")
    assert (await a.authenticate(bearer(ok))).issuer == "https://b.test"


# ---------------------------------------------------------------- JWKS, without the network

def test_parse_jwks_keeps_only_signature_keys(ec_key: Any, rsa_key: Any) -> None:
    doc = keys.jwks_document([(ec_key.public_key(), "e1"), (rsa_key.public_key(), None)])
    doc["keys"] += [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},                       # HS*: skipped
        dict(doc["keys"][0], kid="enc", use="enc"),                             # not for sig
        dict(doc["keys"][0], kid="mislabelled", alg="RS256"),                  # alg vs key
        {"kty": "EC", "crv": "P-256", "kid": "broken", "x": "AA", "y": "AA"},  # not on curve
        "garbage",
    ]
    got = keys.parse_jwks(json.dumps(doc).encode(), "test")
    assert [(k.kid, k.algorithm) for k in got] == [
        ("e1", "ES256"), (keys.jwk_thumbprint(rsa_key.public_key()), "RS256")]


@pytest.mark.parametrize("data, message", [(b"{", "not JSON"), (b"[]", "not a JWKS document"),
                                           (b'{"keys": 1}', "not a JWKS document"),
                                           (b" " * (keys.MAX_JWKS_BYTES + 1), "larger than")])
def test_parse_jwks_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        keys.parse_jwks(data, "test")


def test_thumbprint_is_rfc7638() -> None:
    # RFC 7638 section 3.1's example key and thumbprint
    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
         "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YG"
         "jQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt"
         "-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDK"
         "gw")
    key = jwt.PyJWK({"kty": "RSA", "n": n, "e": "AQAB"}).key
    assert keys.jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_source_refetch_rules(ec_key: Any) -> None:
    t = FakeClock()
    served: list[bytes | Exception] = [json.dumps(keys.jwks_document([(ec_key.public_key(),
                                                                      "a")])).encode()]
    calls: list[str] = []

    async def fetch(url: str) -> bytes:
        calls.append(url)
        await asyncio.sleep(0.01)
        item = served[-1]
        if isinstance(item, Exception):
            raise item
        return item

    src = keys.JwksSource("https://idp.test/jwks", 3600, min_interval_s=5, fetch=fetch, clock=t)
    try:
        # the first callers share one fetch
        first = await asyncio.gather(*(src.keys() for _ in range(5)))
        assert len(calls) == 1 and all([k.kid for k in ks] == ["a"] for ks in first)
        # unknown kid: no refetch within the interval, one after it
        t.now += 1
        await src.refetch()
        assert len(calls) == 1
        t.now += 5
        await asyncio.gather(*(src.refetch() for _ in range(5)))
        assert len(calls) == 2
        # a failing fetch keeps the last good keys
        served.append(RuntimeError("connection refused"))
        t.now += 10
        assert [k.kid for k in await src.refetch()] == ["a"]
        assert src.failures == 1 and len(calls) == 3
        # so does a document with no usable keys
        served.append(b'{"keys": []}')
        t.now += 10
        assert [k.kid for k in await src.refetch()] == ["a"] and src.failures == 2
    finally:
        await src.aclose()


async def test_jwks_source_refreshes_periodically(ec_key: Any) -> None:
    calls = 0

    async def fetch(url: str) -> bytes:
        nonlocal calls
        calls += 1
        return json.dumps(keys.jwks_document([(ec_key.public_key(), f"k{calls}")])).encode()

    src = keys.JwksSource("https://idp.test/jwks", 0.05, fetch=fetch)
    try:
        assert [k.kid for k in await src.keys()] == ["k1"]
        deadline = asyncio.get_running_loop().time() + 5
        while calls < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert calls >= 3 and src.current[0].kid == f"k{calls}"
    finally:
        await src.aclose()
    stopped_at = calls
    await asyncio.sleep(0.15)
    assert calls == stopped_at


# ---------------------------------------------------------------- the demo key and minting

def test_demo_keys_created_once_with_private_modes(tmp_path: Path) -> None:
    d = tmp_path / "gateway"
    private, public = keys.demo_keys(d)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes(), public.read_bytes()
    private.chmod(0o644)
    assert keys.demo_keys(d) == (private, public)
    assert (private.read_bytes(), public.read_bytes()) == before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    public.unlink()
    keys.demo_keys(d)
    assert public.read_bytes() == before[1]


def test_mint_token_round_trip(keydir: Path) -> None:
    token = mint_token("carol", 60, keydir / "rsa.pem", ISS, AUD, kid="k1")
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    body = jwt.decode(token, options={"verify_signature": False})
    assert body["sub"] == "carol" and body["exp"] - body["iat"] == 60 and body["jti"]
    assert "kid" not in jwt.get_unverified_header(mint_token("c", 1, keydir / "ec.pem", ISS,
                                                             AUD))
    for bad in (0, -1, float("nan"), 31 * 86400):
        with pytest.raises(ValueError, match="ttl"):
            mint_token("carol", bad, keydir / "ec.pem", ISS, AUD)
    with pytest.raises(ValueError, match="subject"):
        mint_token("a\nb", 60, keydir / "ec.pem", ISS, AUD)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        mint_token("carol", 60, keydir / "ec.pub.pem", ISS, AUD)


async def test_token_command_mints_what_the_demo_config_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_DEMO_DIR", str(tmp_path / "demo"))
    assert token_main(["dave", "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    assert token_main(["token", "erin"]) == 0              # a leading "token" is tolerated
    token2 = capsys.readouterr().out.strip()
    assert stat.S_IMODE((tmp_path / "demo/gateway" / keys.DEMO_PRIVATE_KEY).stat().st_mode) \
        == 0o600
    # the demo's issuer config, naming the key through $MESH_DEMO_DIR
    (cfg,) = parse_issuers([{"issuer": DEMO_ISSUER, "audiences": [DEMO_AUDIENCE],
                             "keys": ["${MESH_DEMO_DIR}/gateway/" + keys.DEMO_PUBLIC_KEY],
                             "algorithms": ["ES256"]}], "issuers")
    a = Authenticator((cfg,))
    p = await a.authenticate(bearer(token))
    assert (p.subject, p.issuer, p.claims["aud"]) == ("dave", DEMO_ISSUER, DEMO_AUDIENCE)
    assert p.claims["exp"] - p.claims["iat"] == 120
    assert (await a.authenticate(bearer(token2))).subject == "erin"
    await a.aclose()


def test_token_command_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_DEMO_DIR", str(tmp_path / "demo"))
    assert token_main([]) == 2
    assert capsys.readouterr().err.endswith("the following arguments are required: subject\n")
    for bad in ("nan", "inf"):  # a usage error, refused before the demo key is made
        assert token_main(["dave", "--ttl", bad]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == ["python -m demo_services.gateway token: error: argument --ttl: "
                       f"not a finite number: '{bad}'"], err
    assert not (tmp_path / "demo").exists()
    assert token_main(["dave", "--ttl", "-5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "token: ttl: expected seconds in (0, 2592000] (30 days), got -5.0", err


def test_public_interface() -> None:
    for name in ("AuthError", "Principal", "IssuerConfig", "Authenticator", "parse_issuers",
                 "mint_token", "DEMO_ISSUER", "DEMO_AUDIENCE", "demo_keys", "token_main"):
        assert hasattr(auth, name)
    assert DEMO_ISSUER == "https://demo.mesh.local" and DEMO_AUDIENCE == "mesh-demo-gateway"
