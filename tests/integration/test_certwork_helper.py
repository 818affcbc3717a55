"""The sidecar's key and certificate work runs in its short-lived helper process
(``python -m sidecar.certwork``): the sidecar's own process never loads ``cryptography``.
Real helper runs, a real CA; and a real dynamic sidecar that joins and renews without
``cryptography`` in its memory map."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.ca import CertificateAuthority
from mesh_common.spiffe import SpiffeId
from sidecar import identity
from sidecar.identity import IdentityError, WorkloadKey, check_issued, renew_at
from tests.integration.test_control_plane import create_token, start_cp
from tests.integration.test_dynamic_sidecar import admin_get, start_dynamic
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
HOUR = dt.timedelta(hours=1)
ME = SpiffeId("mesh.local", "payment")
PIN_MISMATCH = ("the trust bundle's CA key does not match the join token's pin (was the "
                "mesh's CA rotated after the token was made? then make a new token)")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root("mesh.local", NOW)


def _public(pem_or_csr: bytes) -> Any:
    if pem_or_csr.startswith(b"-----"):
        return serialization.load_pem_private_key(pem_or_csr, None).public_key().public_numbers()
    return x509.load_der_x509_csr(pem_or_csr).public_key().public_numbers()


def _helper(stdin: bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "sidecar.certwork"], input=stdin, cwd=cwd,
                          env=env, capture_output=True, timeout=30)


async def test_the_helper_makes_a_key_signs_csrs_with_it_and_checks_what_the_ca_issued(
        ca: CertificateAuthority) -> None:
    key, first_csr = await WorkloadKey.generate(ME)
    second_csr = await key.csr_der(ME)
    assert _public(first_csr) == _public(second_csr) == _public(key.private_pem())
    assert "PRIVATE" not in repr(key)
    cert_pem = ca.sign_workload_csr(second_csr, "payment", NOW, HOUR).pem
    issued = await check_issued(key, ME, cert_pem, ca.bundle_pem, ca.key_sha256, NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert issued.not_valid_before_utc == cert.not_valid_before_utc
    assert issued.not_valid_after_utc == cert.not_valid_after_utc
    assert issued.trust.cert_serial == format(cert.serial_number, "x")
    assert issued.trust.issuer_sha256 == ca.sha256
    assert issued.bundle_key_hashes == {ca.key_sha256}
    assert renew_at(issued, received=NOW) == NOW + (cert.not_valid_after_utc - NOW) * 2 / 3


@pytest.mark.parametrize("case,message", [
    ("wrong key", "the certificate is not for our key"),
    ("wrong SPIFFE ID", "the certificate names ['spiffe://mesh.local/service/payment'], "
                        "expected exactly spiffe://mesh.local/service/inventory"),
    ("wrong pin", PIN_MISMATCH),
    ("expired", "the certificate is not valid now (check the clocks)"),
])
async def test_the_helper_refuses_a_bad_answer_with_one_line(ca: CertificateAuthority,
                                                            case: str, message: str) -> None:
    key, csr = await WorkloadKey.generate(ME)
    if case == "wrong key":
        csr = (await WorkloadKey.generate(ME))[1]
    cert_pem = ca.sign_workload_csr(csr, "payment", NOW, HOUR).pem
    spiffe_id = SpiffeId("mesh.local", "inventory") if case == "wrong SPIFFE ID" else ME
    pin = "ab" * 32 if case == "wrong pin" else ca.key_sha256
    now = NOW + 2 * HOUR if case == "expired" else NOW
    with pytest.raises(IdentityError) as info:
        await check_issued(key, spiffe_id, cert_pem, ca.bundle_pem, pin, now)
    assert str(info.value) == message


@pytest.mark.parametrize("request_bytes,needle", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"op": "sign"}', "unknown op"),
    (b'{"op": "csr", "service": "payment"}', "'spiffe_uri'"),
    (b'{"op": "check", "key_pem": "k", "spiffe_uri": "u", "cert_pem": "c", "bundle_pem": "b",'
     b' "pins": null, "now_unix": "soon"}', "'now_unix'"),
    (b'{"op": "check", "key_pem": "k", "spiffe_uri": "u", "cert_pem": "c", "bundle_pem": "b",'
     b' "pins": "ab", "now_unix": 1}', "'pins'"),
])
def test_a_malformed_request_exits_2_with_one_line(tmp_path: Path, request_bytes: bytes,
                                                   needle: str) -> None:
    r = _helper(request_bytes, tmp_path)
    assert r.returncode == 2, r
    assert r.stdout == b""
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar.certwork: malformed request:"), lines
    assert needle in lines[0], lines


def test_the_key_is_on_stdout_only_in_the_answer_that_made_it(tmp_path: Path) -> None:
    made = _helper(json.dumps({"op": "csr", "spiffe_uri": ME.uri, "service": "payment",
                               "key_pem": None}).encode(), tmp_path)
    assert made.returncode == 0 and made.stderr == b"", made
    key_pem = json.loads(made.stdout)["key_pem"]
    assert key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    again = _helper(json.dumps({"op": "csr", "spiffe_uri": ME.uri, "service": "payment",
                                "key_pem": key_pem}).encode(), tmp_path)
    assert again.returncode == 0 and again.stderr == b"", again
    assert set(json.loads(again.stdout)) == {"ok", "csr_der_b64"}
    refused = _helper(json.dumps({"op": "check", "key_pem": key_pem, "spiffe_uri": ME.uri,
                                  "cert_pem": "garbage", "bundle_pem": "garbage", "pins": None,
                                  "now_unix": NOW.timestamp()}).encode(), tmp_path)
    answer = json.loads(refused.stdout)
    assert refused.returncode == 0 and answer["ok"] is False, refused
    assert answer["error"].startswith("unreadable certificate or bundle")
    body = key_pem.splitlines()[1]
    assert body not in refused.stdout.decode() + refused.stderr.decode()


def test_importing_the_sidecars_identity_modules_does_not_load_cryptography() -> None:
    code = ("import sys, sidecar.identity, sidecar.dynamic\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


async def test_a_helper_that_overruns_its_time_is_killed_and_said_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[asyncio.subprocess.Process] = []
    spawn = asyncio.create_subprocess_exec

    async def recording(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        started.append(await spawn(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(identity.asyncio, "create_subprocess_exec", recording)
    monkeypatch.setattr(identity, "HELPER_TIMEOUT_S", 0.01)
    with pytest.raises(IdentityError, match=r"did not answer within 0\.01 s \(killed\)"):
        await WorkloadKey.generate(ME)
    assert len(started) == 1 and started[0].returncode == -9


async def test_a_helper_that_cannot_start_is_said_so(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(identity.sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(IdentityError, match="cannot start the certificate helper"):
        await WorkloadKey.generate(ME)


async def test_the_helper_runs_from_any_cwd_and_not_a_stray_package_there(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stray = tmp_path / "sidecar"
    stray.mkdir()
    (stray / "__init__.py").write_text("")
    (stray / "certwork.py").write_text("raise SystemExit('the stray package ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    key, csr = await WorkloadKey.generate(ME)
    assert _public(csr) == _public(key.private_pem())


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.slow  # 5 s; joins and renewals run in the default suite's dynamic-sidecar tests
def test_a_dynamic_sidecar_joins_and_renews_without_cryptography_in_its_memory(
        tmp_path: Path) -> None:
    cp = start_cp(tmp_path / "ca", tmp_path / "data", "--cert-ttl", "6")  # renewal at ~4 s
    sidecar = None
    try:
        sidecar = start_dynamic(tmp_path, "--service", "echo", "--token",
                                create_token(cp, "echo"))
        procs.wait_for(lambda: admin_get(sidecar, "/stats")[1]["identity"]["renewals"] >= 1,
                       20, interval_s=0.2, what="the sidecar to renew its certificate")
        identity_stats = admin_get(sidecar, "/stats")[1]["identity"]
        assert identity_stats["last_error"] is None and identity_stats["cert_serial"]
        maps = Path(f"/proc/{sidecar.pid}/maps").read_text()
        assert "cryptography" not in maps
        procs.wait_for(lambda: _children(sidecar.pid) == [], 10,
                       what="no helper process left behind")
        assert sidecar.stop() == 0, sidecar.log_tail()
        assert "PRIVATE KEY" not in sidecar.log_text()
    finally:
        if sidecar is not None and sidecar.alive():
            sidecar.stop()
        cp.proc.stop()
