"""The CA rotation: the phases' trust, the state machine (pure), the CA dir through a whole
rotation and a restart in the middle of one, the CAs a rotation accepts, and what a sidecar
reports of its identity."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control_plane import ca as CA
from control_plane import rotation as R
from mesh_common.spiffe import SpiffeId
from protos.mesh.v1 import control_pb2 as pb
from sidecar.certwork import CheckFailed, bundle_key_hashes, check, make_key_and_csr, trust_fields

pytestmark = pytest.mark.timeout(30)

TD = "mesh.local"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
T0 = NOW.timestamp()
SETTINGS = R.RotationSettings(phase_timeout_s=60, min_phase_s=2, retell_s=5, tick_s=1)


@pytest.fixture(scope="module")
def old() -> CA.CertificateAuthority:
    return CA.CertificateAuthority.create_root(TD, NOW, label="old")


@pytest.fixture(scope="module")
def new() -> CA.CertificateAuthority:
    return CA.CertificateAuthority.create_root(TD, NOW, label="new")


def shas(pem: bytes) -> set[str]:
    return {CA.cert_sha256(c) for c in CA.pem_certs(pem)}


def sidecar(name: str, trust: R.Trust | None = None, *, issuer: str = "", bundle: str = "",
            connected: bool = True) -> R.SidecarTrust:
    """A sidecar holding ``trust``'s bundle and a certificate of its signer (or what the
    keywords say)."""
    if trust is not None:
        issuer, bundle = issuer or trust.signer.sha256, bundle or trust.bundle_sha256
    return R.SidecarTrust(("svc", name), "1f", issuer, bundle, connected)


# ---------------------------------------------------------------------- trust per phase
def test_each_phase_signs_hands_out_and_accepts_what_the_rotation_needs(old, new) -> None:
    both = shas(old.chain_pem) | shas(new.chain_pem)
    idle = R.trust_for(R.IDLE, old, None)
    assert idle.signer.sha256 == old.sha256 and shas(idle.bundle_pem) == {old.sha256}
    assert idle.signer.key_sha256 == old.key_sha256
    expect = {  # phase: (signer, workloads' bundle, listeners' client roots)
        R.BUNDLE_BOTH: (old.sha256, both, both),
        R.REISSUE: (new.sha256, both, both),
        R.DROP_OLD: (new.sha256, {new.sha256}, both),
        R.DONE: (new.sha256, {new.sha256}, {new.sha256}),
    }
    for phase, (signer, bundle, roots) in expect.items():
        t = R.trust_for(phase, old, new)
        assert (t.phase, t.signer.sha256) == (phase, signer)
        assert shas(t.bundle_pem) == bundle, phase
        assert shas(t.server_roots_pem) == roots, phase
        # new tokens pin the new CA from the moment it is in the bundle
        assert t.signer.key_sha256 == new.key_sha256, phase
        assert t.bundle_sha256 == hashlib.sha256(t.bundle_pem).hexdigest()
    # The new root never shares the old one's subject (chains are built by name).
    assert old.cert.subject != new.cert.subject


def test_the_view_keeps_the_signer_and_its_chain(old, new) -> None:
    t = R.trust_for(R.BUNDLE_BOTH, old, new)
    issued = t.signer.sign_workload_csr(_csr(), "payment", NOW, dt.timedelta(hours=1))
    cert = x509.load_pem_x509_certificate(issued.pem)
    cert.verify_directly_issued_by(old.cert)
    assert t.signer.chain_pem == old.chain_pem


def test_the_goal_is_the_bundle_then_the_bundle_and_the_new_issuer(old, new) -> None:
    both = R.trust_for(R.BUNDLE_BOTH, old, new)
    assert R.goal_of(both) == R.Goal(both.bundle_sha256, "")
    for phase in (R.REISSUE, R.DROP_OLD, R.DONE):
        t = R.trust_for(phase, old, new)
        assert R.goal_of(t) == R.Goal(t.bundle_sha256, new.sha256)
    # BUNDLE_BOTH: the old certificate is fine, the old bundle is not.
    g = R.goal_of(both)
    assert R.caught_up(g, sidecar("a", issuer=old.sha256, bundle=both.bundle_sha256))
    assert not R.caught_up(g, sidecar("a", R.trust_for(R.IDLE, old, None)))
    g = R.goal_of(R.trust_for(R.REISSUE, old, new))
    assert not R.caught_up(g, sidecar("a", issuer=old.sha256, bundle=both.bundle_sha256))


# ---------------------------------------------------------------------- the state machine
def _state(phase: str = R.BUNDLE_BOTH, since: float = T0) -> R.RotationState:
    return R.RotationState("20260101000000-abcd", phase, T0, since, "o" * 64, "n" * 64)


def test_a_phase_waits_for_every_connected_sidecar_and_for_its_minimum(old, new) -> None:
    t = R.trust_for(R.BUNDLE_BOTH, old, new)
    goal = R.goal_of(t)
    behind = sidecar("b", R.trust_for(R.IDLE, old, None))
    gone = sidecar("c", R.trust_for(R.IDLE, old, None), connected=False)
    s = R.step(_state(), goal, [sidecar("a", t), behind, gone], {}, T0 + 10, SETTINGS)
    assert not s.advanced and s.state.phase == R.BUNDLE_BOTH
    assert s.renew == (("svc", "b"),)  # the disconnected one is not waited for
    s = R.step(_state(), goal, [sidecar("a", t), gone], {}, T0 + 1, SETTINGS)
    assert not s.advanced, "a phase lasts at least min_phase_s"
    s = R.step(_state(), goal, [sidecar("a", t), gone], {}, T0 + 2, SETTINGS)
    assert s.advanced and s.state.phase == R.REISSUE and s.state.phase_since == T0 + 2
    assert s.renew == ()


def test_the_ones_behind_are_told_at_once_then_every_retell_s(old, new) -> None:
    t = R.trust_for(R.REISSUE, old, new)
    goal = R.goal_of(t)
    late = [sidecar(n, issuer=old.sha256, bundle=t.bundle_sha256) for n in ("x", "y")]
    s = R.step(_state(R.REISSUE), goal, late, {}, T0, SETTINGS)
    assert s.renew == (("svc", "x"), ("svc", "y"))
    told = {("svc", "x"): T0, ("svc", "y"): T0 + 3}
    s = R.step(_state(R.REISSUE), goal, late, told, T0 + 5, SETTINGS)
    assert s.renew == (("svc", "x"),)


def test_a_stuck_phase_says_who_is_behind_and_keeps_waiting(old, new) -> None:
    t = R.trust_for(R.DROP_OLD, old, new)
    goal = R.goal_of(t)
    stale = [sidecar(f"i{n}", R.trust_for(R.REISSUE, old, new)) for n in range(7)]
    s = R.step(_state(R.DROP_OLD), goal, stale, {}, T0 + 59, SETTINGS)
    assert s.state.error == ""
    s = R.step(_state(R.DROP_OLD), goal, stale, {}, T0 + 61, SETTINGS)
    assert not s.advanced and s.state.phase == R.DROP_OLD
    assert s.state.error.startswith("DROP_OLD for 61s: 7 connected sidecar(s)")
    assert "svc/i0" in s.state.error and "and 2 more" in s.state.error
    # Once they catch up the error goes and the rotation moves on.
    s = R.step(s.state, goal, [sidecar("i0", t)], {}, T0 + 62, SETTINGS)
    assert s.advanced and s.state.phase == R.DONE and s.state.error == ""
    assert not R.step(s.state, goal, [], {}, T0 + 99, SETTINGS).advanced  # DONE stays


def test_sidecars_that_renew_when_told_carry_a_rotation_to_done(old, new) -> None:
    """The whole walk, with sidecars that take whatever the phase hands out."""
    state, now = _state(), T0
    held = {n: R.trust_for(R.IDLE, old, None) for n in ("a", "b", "c")}
    phases = [state.phase]
    for _ in range(20):
        trust = R.trust_for(state.phase, old, new)
        views = [sidecar(n, t) for n, t in held.items()]
        s = R.step(state, R.goal_of(trust), views, {}, now, SETTINGS)
        for key in s.renew:
            held[key[1]] = trust  # the renewal answers the phase's bundle and signer
        if s.advanced:
            phases.append(s.state.phase)
        state, now = s.state, now + 1
        if state.phase == R.DONE:
            break
    assert phases == [R.BUNDLE_BOTH, R.REISSUE, R.DROP_OLD, R.DONE]
    assert all(t.signer.sha256 == new.sha256 and shas(t.bundle_pem) == {new.sha256}
               for t in held.values())


def test_the_state_document_round_trips_and_a_bad_one_is_refused() -> None:
    s = _state(R.REISSUE)
    assert R.RotationState.from_doc(json.loads(json.dumps(s.to_doc()))) == s
    for bad in ([], {"phase": "REISSUE"}, {**s.to_doc(), "phase": "LATER"},
                {**s.to_doc(), "phase": "IDLE"}, {**s.to_doc(), "rotation_id": "../x"},
                {**s.to_doc(), "started_at": "soon"}):
        with pytest.raises(ValueError):
            R.RotationState.from_doc(bad)
    rid = R.new_rotation_id(T0)
    assert rid[:14] == NOW.strftime("%Y%m%d%H%M%S") and len(rid) == 19


def test_the_status_rows_name_every_ca_once(old, new) -> None:
    t = R.trust_for(R.DROP_OLD, old, new)
    rows = {r.sha256: r for r in R.ca_rows(t, [old, new])}
    assert set(rows) == {old.sha256, new.sha256}
    assert rows[new.sha256].signing and rows[new.sha256].in_bundle
    assert not rows[old.sha256].signing and not rows[old.sha256].in_bundle
    assert "new" in rows[new.sha256].subject
    assert rows[old.sha256].not_after_unix == int(old.cert.not_valid_after_utc.timestamp())


# ---------------------------------------------------------------------- the manager and the CA dir
@dataclass
class FakeSession:
    """A connected sidecar that renews (takes the manager's trust) when told."""

    name: str
    manager: R.RotationManager
    cert_serial: str = "1"
    issuer_sha256: str = ""
    bundle_sha256: str = ""
    connected: bool = True
    obedient: bool = True
    told: int = 0
    sent: list[pb.ControlMessage] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return ("svc", self.name)

    def send(self, message: pb.ControlMessage) -> bool:
        self.sent.append(message)
        self.told += 1
        if self.obedient:
            self.renew()
        return True

    def renew(self) -> None:
        t = self.manager.trust
        self.issuer_sha256, self.bundle_sha256 = t.signer.sha256, t.bundle_sha256


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _manager(ca_dir: Path, clock: Clock) -> R.RotationManager:
    restored = R.restore(ca_dir, TD, lambda: CA.load_or_create(ca_dir, TD, NOW))
    return R.RotationManager(restored, ca_dir=ca_dir, settings=SETTINGS, clock=clock)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_rotation_through_the_ca_dir_with_a_restart_in_the_middle(tmp_path: Path) -> None:
    ca_dir, clock = tmp_path / "ca", Clock()
    m = _manager(ca_dir, clock)
    first = m.trust.signer
    assert m.phase == R.IDLE and R.read_state(ca_dir) is None
    swaps: list[str] = []
    m.listeners.append(lambda t: swaps.append(t.phase))
    sessions = [FakeSession("a", m), FakeSession("b", m)]
    for s in sessions:
        s.renew()
    m.attach(lambda: sessions)
    state = m.begin()
    assert state.phase == R.BUNDLE_BOTH and swaps == [R.BUNDLE_BOTH]
    new_sha = state.new_sha256
    assert _mode(ca_dir / CA.NEXT_KEY_FILE) == 0o600 and _mode(ca_dir / R.STATE_FILE) == 0o600
    assert shas((ca_dir / CA.CA_CERT_FILE).read_bytes()) == {first.sha256, new_sha}
    with pytest.raises(R.RotationError) as busy:
        m.begin()
    assert busy.value.code == "FAILED_PRECONDITION" and state.rotation_id in busy.value.message

    m.tick()  # everyone is told, renews, but the phase lasts min_phase_s
    assert [s.told for s in sessions] == [1, 1] and m.phase == R.BUNDLE_BOTH
    clock.t += 2
    m.tick()  # -> REISSUE (told again, renew from the new CA at once)
    assert m.phase == R.REISSUE and [s.told for s in sessions] == [2, 2]
    assert CA.admin_issued_by(ca_dir, m.new)  # meshctl's identity follows the signer
    assert all(s.issuer_sha256 == new_sha for s in sessions)

    # The control plane restarts here: the CA dir continues the rotation.
    again = _manager(ca_dir, clock)
    assert again.phase == R.REISSUE and again.trust.signer.sha256 == new_sha
    assert again.trust.bundle_sha256 == m.trust.bundle_sha256
    assert again.old.sha256 == first.sha256
    m = again
    for s in sessions:
        s.manager = m
    m.attach(lambda: sessions)
    sessions[1].obedient = False  # b ignores the next renewal
    clock.t += 2
    m.tick()  # REISSUE is done -> DROP_OLD; b stays behind
    assert m.phase == R.DROP_OLD
    clock.t += 2
    m.tick()
    assert m.phase == R.DROP_OLD and m.state.error == ""
    clock.t += SETTINGS.phase_timeout_s
    m.tick()
    assert "svc/b" in m.state.error and sessions[1].told >= 4  # told again meanwhile
    assert R.read_state(ca_dir).error == m.state.error  # the error is persisted
    status = m.status()
    assert status.error == m.state.error and status.phase == R.DROP_OLD
    assert [(s.instance, s.caught_up) for s in status.sidecars] == [("a", True), ("b", False)]
    sessions[1].renew()
    m.tick()
    assert m.phase == R.DONE and m.state.error == ""

    # DONE: the new CA is the CA dir's, the old one archived (key 0600), trusted nowhere.
    assert shas((ca_dir / CA.CA_CERT_FILE).read_bytes()) == {new_sha}
    assert not (ca_dir / CA.NEXT_KEY_FILE).exists() and not (ca_dir / CA.PREV_CERT_FILE).exists()
    archived = ca_dir / CA.ARCHIVE_DIR / f"{state.rotation_id}-ca-key.pem"
    assert _mode(archived) == 0o600
    assert CA.load(ca_dir / CA.ARCHIVE_DIR / f"{state.rotation_id}-ca.pem", archived,
                   TD).sha256 == first.sha256
    assert shas(m.trust.server_roots_pem) == {new_sha}
    status = m.status()
    cas = {c.sha256: (c.signing, c.in_bundle) for c in status.cas}
    assert cas == {new_sha: (True, True), first.sha256: (False, False)}
    assert all(s.caught_up for s in status.sidecars)

    # A restart after DONE loads the new CA from the CA dir; another rotation can start.
    later = _manager(ca_dir, clock)
    assert later.phase == R.DONE and later.trust.signer.sha256 == new_sha
    assert later.trust.bundle_sha256 == m.trust.bundle_sha256
    assert later.begin().old_sha256 == new_sha


def test_a_crash_in_the_middle_of_the_end_is_finished_at_the_next_start(tmp_path: Path) -> None:
    ca_dir, clock = tmp_path / "ca", Clock()
    m = _manager(ca_dir, clock)
    state = m.begin()
    new_sha = state.new_sha256
    # The state says DONE, but only the archive and the key swap happened.
    R.write_state(ca_dir, R.RotationState(state.rotation_id, R.DONE, T0, T0, state.old_sha256,
                                          new_sha))
    (ca_dir / CA.ARCHIVE_DIR).mkdir()
    (ca_dir / CA.CA_KEY_FILE).replace(ca_dir / CA.ARCHIVE_DIR / f"{state.rotation_id}-ca-key.pem")
    (ca_dir / CA.NEXT_KEY_FILE).replace(ca_dir / CA.CA_KEY_FILE)
    later = _manager(ca_dir, clock)
    assert later.trust.signer.sha256 == new_sha
    assert shas((ca_dir / CA.CA_CERT_FILE).read_bytes()) == {new_sha}
    assert not (ca_dir / CA.NEXT_CERT_FILE).exists()


def test_a_rotation_that_never_started_leaves_nothing(tmp_path: Path) -> None:
    ca_dir, clock = tmp_path / "ca", Clock()
    m = _manager(ca_dir, clock)
    first = m.trust.signer.sha256
    CA.write_ca(ca_dir, CA.CertificateAuthority.create_root(TD, NOW), CA.NEXT_CERT_FILE,
                CA.NEXT_KEY_FILE)  # a crash before rotation.json was written
    later = _manager(ca_dir, clock)
    assert later.phase == R.IDLE and later.trust.signer.sha256 == first
    assert not (ca_dir / CA.NEXT_KEY_FILE).exists()


def test_a_state_that_names_other_cas_is_refused(tmp_path: Path) -> None:
    ca_dir, clock = tmp_path / "ca", Clock()
    m = _manager(ca_dir, clock)
    state = m.begin()
    R.write_state(ca_dir, R.RotationState(state.rotation_id, R.REISSUE, T0, T0, "0" * 64,
                                          state.new_sha256))
    with pytest.raises(ValueError, match="the CAs found are"):
        _manager(ca_dir, clock)
    (ca_dir / R.STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a rotation state"):
        _manager(ca_dir, clock)


def test_an_empty_mesh_rotates_in_memory_phase_by_phase(old) -> None:
    clock = Clock()
    m = R.RotationManager(R.Restored(old, None, None), settings=SETTINGS, clock=clock)
    m.begin()
    for _ in range(3):
        clock.t += SETTINGS.min_phase_s
        m.tick()
    assert m.phase == R.DONE and m.trust.signer.sha256 != old.sha256
    with pytest.raises(R.RotationError) as same:
        m.begin(m.trust.signer)
    assert same.value.code == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------- CAs handed over
def _intermediate(root: CA.CertificateAuthority, *, ca: bool = True,
                  days: float = 365) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "org issuing CA")]))
            .issuer_name(root.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(hours=1))
            .not_valid_after(NOW + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                           critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca,
                                         crl_sign=ca, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(root.key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem


def test_an_intermediate_with_its_chain_is_accepted_and_signs(old) -> None:
    org_root = CA.CertificateAuthority.create_root(TD, NOW, label="org")
    pem, key_pem = _intermediate(org_root)
    inter = CA.parse_ca(pem + org_root.chain_pem, key_pem, TD, NOW)
    assert shas(inter.chain_pem) == {inter.sha256, org_root.sha256}
    t = R.trust_for(R.REISSUE, old, inter)
    assert shas(t.bundle_pem) == {old.sha256, inter.sha256, org_root.sha256}
    issued = t.signer.sign_workload_csr(_csr(), "payment", NOW, dt.timedelta(hours=1))
    x509.load_pem_x509_certificate(issued.pem).verify_directly_issued_by(inter.cert)


@pytest.mark.parametrize("case,message", [
    ("not a ca", "not a CA certificate"),
    ("other key", "does not match"),
    ("expires", "less than 1 day"),
    ("garbage", "not a PEM certificate"),
    ("bad key", "not an unencrypted PEM private key"),
    ("chain order", "out of order"),
])
def test_an_unusable_ca_is_refused_with_the_reason(old, case: str, message: str) -> None:
    pem, key_pem = _intermediate(old, ca=case != "not a ca",
                                 days=0.5 if case == "expires" else 365)
    if case == "other key":
        key_pem = _intermediate(old)[1]
    if case == "garbage":
        pem = b"hello"
    if case == "bad key":
        key_pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    if case == "chain order":
        other = CA.CertificateAuthority.create_root(TD, NOW, label="other")
        pem += other.chain_pem
    with pytest.raises(ValueError, match=message) as info:
        CA.parse_ca(pem, key_pem, TD, NOW)
    assert "PRIVATE KEY" not in str(info.value)


# ---------------------------------------------------------------------- what a sidecar reports
ME_URI = SpiffeId(TD, "payment").uri


def _csr() -> bytes:
    """A CSR for ``payment`` with a new key."""
    return make_key_and_csr(ME_URI, "payment", None)[1]


def test_a_sidecar_reports_its_serial_bundle_and_issuer(old, new) -> None:
    key_pem, csr = make_key_and_csr(ME_URI, "payment", None)
    t = R.trust_for(R.REISSUE, old, new)
    issued = t.signer.sign_workload_csr(csr, "payment", NOW, dt.timedelta(hours=1))
    later = T0 + 60
    fields = check(key_pem, ME_URI, issued.pem, t.bundle_pem, None, later)
    assert fields["cert_serial"] == format(issued.serial, "x")
    assert fields["bundle_sha256"] == t.bundle_sha256  # what the control plane compares with
    assert fields["issuer_sha256"] == new.sha256
    assert set(fields["bundle_key_hashes"]) == {old.key_sha256, new.key_sha256}
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert trust_fields(cert, old.chain_pem)["issuer_sha256"] == ""  # not in that bundle
    # A join checks the token's pin; a join again also accepts a CA key already trusted.
    done = R.trust_for(R.DONE, old, new)
    with pytest.raises(CheckFailed, match="was the mesh's CA rotated"):
        check(key_pem, ME_URI, issued.pem, done.bundle_pem, [old.key_sha256], later)
    check(key_pem, ME_URI, issued.pem, done.bundle_pem,
          [old.key_sha256, *bundle_key_hashes(t.bundle_pem)], later)
