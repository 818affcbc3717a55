"""Bearer JWTs against a real JWKS endpoint (aiohttp on loopback, in-process), and through the
gateway process.

In-process: an issuer rotates its keys (a token signed by the new key is accepted at once via
the unknown-kid refetch, the old key's token is refused once the key leaves the document), a
flood of made-up key ids costs the issuer at most one fetch per interval, a failing or vanished
JWKS endpoint keeps the last good keys, an endpoint that is down from the start refuses tokens
quickly instead of hanging.

The process: ``python -m demo_services.gateway serve`` with a JWKS issuer and the demo issuer
answers 401 with the reason for missing, expired and wrong-audience tokens, lets through a
token minted by ``python -m demo_services.gateway token``, and accepts a rotated key.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from demo_services.gateway import keys
from demo_services.gateway.auth import (
    DEMO_AUDIENCE,
    DEMO_ISSUER,
    Authenticator,
    AuthError,
    parse_issuers,
)
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

ISS = "https://idp.test"
AUD = "gateway-it"


class JwksServer:
    """A JWKS endpoint on 127.0.0.1: ``publish`` sets the key set, ``status`` != 200 or
    ``body`` set make it fail; ``hits`` counts requests."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.status = 200
        self.body: bytes | None = None
        self.hits = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    def publish(self, *pairs: tuple[Any, str]) -> None:
        self.doc = keys.jwks_document([(k.public_key(), kid) for k, kid in pairs])

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response(self.doc)

    async def start(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks.json"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = await JwksServer().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def rsa_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_b() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def token(key: Any, kid: str | None, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300}
    claims.update(over)
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def authenticator(url: str, refresh_s: float) -> Authenticator:
    doc = [{"issuer": ISS, "audiences": [AUD], "jwks_url": url, "jwks_refresh_s": refresh_s}]
    return Authenticator(parse_issuers(doc, "issuers"))


async def outcome(authn: Authenticator, tok: str) -> str:
    """'ok:<subject>' or the AuthError reason."""
    try:
        return "ok:" + (await authn.authenticate(f"Bearer {tok}")).subject
    except AuthError as e:
        return e.reason


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- in-process

async def test_rotated_key(jwks: JwksServer, rsa_a: Any, ec_b: Any) -> None:
    jwks.publish((rsa_a, "a"))
    authn = authenticator(jwks.url, refresh_s=0.5)
    try:
        old, new = token(rsa_a, "a", sub="old"), token(ec_b, "b", sub="new")
        assert await outcome(authn, old) == "ok:old"
        # the issuer publishes its next key (ES256) next to the current one (RS256)
        jwks.publish((rsa_a, "a"), (ec_b, "b"))

        async def new_accepted() -> bool:
            return await outcome(authn, new) == "ok:new"
        await eventually(new_accepted, 5, "the new key's token accepted")
        assert await outcome(authn, old) == "ok:old"
        # ... then retires the old one
        jwks.publish((ec_b, "b"))

        async def old_refused() -> bool:
            return await outcome(authn, old) == "unknown key id"
        await eventually(old_refused, 5, "the old key's token refused")
        assert await outcome(authn, new) == "ok:new"
        # a token reusing the retired kid but signed by an unknown key: still refused
        assert await outcome(authn, token(ec.generate_private_key(ec.SECP256R1()), "b")) \
            == "bad signature"
    finally:
        await authn.aclose()


async def test_unknown_kid_refetches_at_once_but_rate_limited(jwks: JwksServer, rsa_a: Any,
                                                              ec_b: Any) -> None:
    jwks.publish((rsa_a, "a"))
    authn = authenticator(jwks.url, refresh_s=3600)      # no periodic refresh in this test
    source = authn.jwks_source(ISS)
    assert source is not None
    source.min_interval_s = 0.5
    try:
        assert await outcome(authn, token(rsa_a, "a")) == "ok:alice"
        assert jwks.hits == 1
        # a flood of made-up key ids: at most one more fetch
        forged = [token(ec_b, f"made-up-{i}") for i in range(40)]
        results = await asyncio.gather(*(outcome(authn, t) for t in forged))
        assert set(results) == {"unknown key id"}
        assert jwks.hits <= 2
        # a new key: accepted on its first use after the interval, without a periodic refresh
        jwks.publish((rsa_a, "a"), (ec_b, "b"))
        await asyncio.sleep(0.55)
        before = jwks.hits
        assert await outcome(authn, token(ec_b, "b")) == "ok:alice"
        assert jwks.hits == before + 1
        # a token without kid is tried against every key of the set
        assert await outcome(authn, token(ec_b, None)) == "ok:alice"
    finally:
        await authn.aclose()


async def test_jwks_failures_keep_the_last_good_keys(jwks: JwksServer, rsa_a: Any) -> None:
    jwks.publish((rsa_a, "a"))
    authn = authenticator(jwks.url, refresh_s=0.1)
    source = authn.jwks_source(ISS)
    assert source is not None
    good = token(rsa_a, "a")
    try:
        assert await outcome(authn, good) == "ok:alice"
        for break_it in (lambda: setattr(jwks, "status", 500),
                         lambda: (setattr(jwks, "status", 200),
                                  setattr(jwks, "body", b"{not json")),
                         lambda: setattr(jwks, "body", b'{"keys": []}')):
            break_it()
            failures = source.failures

            async def failed_twice(before: int = failures) -> bool:
                return source.failures >= before + 2
            await eventually(failed_twice, 5, "two failed refreshes")
            assert await outcome(authn, good) == "ok:alice"
        await jwks.stop()                                  # gone entirely
        failures = source.failures

        async def refused_connections() -> bool:
            return source.failures >= failures + 2
        await eventually(refused_connections, 5, "two refused fetches")
        assert await outcome(authn, good) == "ok:alice"
    finally:
        await authn.aclose()


async def test_jwks_down_from_the_start_refuses_quickly(rsa_a: Any) -> None:
    url = f"http://127.0.0.1:{procs.free_port()}/jwks.json"
    authn = authenticator(url, refresh_s=60)
    try:
        t0 = time.monotonic()
        assert await outcome(authn, token(rsa_a, "a")) == "unknown key id"
        assert await outcome(authn, token(rsa_a, None)) == "no key for this algorithm"
        assert time.monotonic() - t0 < 3
        assert await outcome(authn, token(rsa_a, "a", iss="https://other.test")) \
            == "wrong issuer"
    finally:
        await authn.aclose()


# ---------------------------------------------------------------- the gateway process

def gateway_config(path: Path, jwks_url: str) -> None:
    doc = {
        "issuers": [
            {"issuer": ISS, "audiences": [AUD], "jwks_url": jwks_url, "jwks_refresh_s": 0.5,
             "algorithms": ["RS256", "ES256"]},
            {"issuer": DEMO_ISSUER, "audiences": [DEMO_AUDIENCE],
             "keys": ["${MESH_DEMO_DIR}/gateway/" + keys.DEMO_PUBLIC_KEY],
             "algorithms": ["ES256"]},
        ],
        "routes": [{"name": "get_order", "http": "GET /v1/orders/{order_id}",
                    "grpc": "order.Order/GetOrder", "timeout_s": 1}],
    }
    path.write_text(json.dumps(doc))                       # JSON is YAML


async def test_gateway_process_answers_401_with_the_reason(tmp_path: Path, jwks: JwksServer,
                                                           rsa_a: Any, ec_b: Any) -> None:
    env = {"MESH_DEMO_DIR": str(tmp_path / "demo"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    # the demo token command makes the demo key the gateway's config names
    minted = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "demo_services.gateway", "token", "dana",
                         "--ttl", "60"],
        env={**os.environ, **env}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert minted.returncode == 0, minted.stderr
    demo_token = minted.stdout.strip()
    assert "PRIVATE" not in minted.stdout + minted.stderr

    jwks.publish((rsa_a, "a"))
    config = tmp_path / "gateway.yaml"
    gateway_config(config, jwks.url)
    cmd = [sys.executable, "-m", "demo_services.gateway", "serve", "--config", str(config),
           "--listen", "127.0.0.1:0", "--outbound", f"127.0.0.1:{procs.free_port()}"]
    gw = await asyncio.to_thread(procs.start, cmd, env=env, cwd=REPO_ROOT, ready_timeout_s=30)
    try:
        url = gw.ready["url"] + "/v1/orders/o-1"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async def get(tok: str | None) -> tuple[int, dict[str, Any], str]:
                headers = {"Authorization": f"Bearer {tok}"} if tok else {}
                async with http.get(url, headers=headers) as r:
                    return r.status, await r.json(), r.headers.get("WWW-Authenticate", "")

            for tok, reason in [
                (None, "missing bearer token"),
                (token(rsa_a, "a", exp=int(time.time()) - 600), "token expired"),
                (token(rsa_a, "a", aud="elsewhere"), "wrong audience"),
                (token(ec_b, "b"), "unknown key id"),
                (jwt.encode({"iss": ISS, "sub": "x", "aud": AUD, "exp": 2**40}, "k" * 32,
                            algorithm="HS256"), "algorithm not allowed"),
            ]:
                status, body, challenge = await get(tok)
                assert status == 401, (reason, body)
                assert body["error"]["message"] == reason
                assert challenge.startswith("Bearer")
            # authenticated: past the 401 (there is no sidecar behind it: 5xx from upstream)
            for tok in (token(rsa_a, "a"), demo_token):
                status, body, _ = await get(tok)
                assert status != 401, body
            # the issuer rotates: the new key's token gets through the running gateway
            jwks.publish((rsa_a, "a"), (ec_b, "b"))
            rotated = token(ec_b, "b")

            async def rotated_accepted() -> bool:
                return (await get(rotated))[0] != 401
            await eventually(rotated_accepted, 10, "the rotated key accepted by the gateway")
        assert demo_token not in gw.log_text()
    finally:
        await asyncio.to_thread(gw.stop)
