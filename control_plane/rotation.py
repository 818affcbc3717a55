"""CA rotation without an outage: a new CA joins the trust bundle beside the old one, every
workload is re-issued by it, then the old one leaves the bundle.

The phases (``GetCAStatusResponse.phase``)::

    IDLE         no rotation yet: one CA signs and is the bundle
    BUNDLE_BOTH  the new CA (a generated root, or a given intermediate) is in the bundle
                 beside the old; the old one still signs. Done when every connected sidecar
                 verifies peers with the two-CA bundle (its certificate may be the old CA's).
    REISSUE      the new CA signs (workloads, meshctl's admin identity, the control plane's
                 listeners). Done when every connected sidecar holds a certificate of the new
                 CA (and still the two-CA bundle).
    DROP_OLD     workloads get the new CA alone as their bundle. Done when every connected
                 sidecar has it. The control plane's listeners still accept the old CA's
                 client certificates, so a late sidecar can still renew.
    DONE         the old CA is trusted nowhere; its key is archived in the CA dir.

Each phase lasts at least ``min_phase_s`` and moves on once every connected sidecar reports
(``Register``/``StateReport``: ``bundle_sha256``, ``issuer_sha256``) what the phase asks for.
Entering a phase tells every sidecar to renew (``RenewCertificate`` on its discovery stream);
one still behind is told again every ``retell_s``; a phase not done after ``phase_timeout_s``
sets ``error`` (naming who is behind) and keeps waiting. Both sides trust old and new during
the overlap, so no handshake fails: a sidecar re-issued by the new CA only meets peers that
already trust it, and the old CA leaves a bundle only once nobody presents its certificates.

Join tokens pin the CA key of the bundle's newest CA (from ``BUNDLE_BOTH`` on, the new
one). A token made before the rotation pins the old key: a first join with it works while
the old CA is in the bundle (``BUNDLE_BOTH``, ``REISSUE``), and from ``DROP_OLD`` on the
sidecar refuses the answer (its bundle no longer carries the pin): make a new token.

The state is ``rotation.json`` in the CA dir (no secrets), beside the CA files
(``control_plane.ca``), so a restarted control plane continues where it was.

Pure: the phases, ``trust_for`` (what each phase signs with and hands out), ``step`` (the
state machine), the status rows. I/O: ``read_state``/``write_state``, ``restore``, the
``ServingCredentials`` of the control plane's mTLS listeners and the ``RotationManager``
that drives a rotation from the control plane's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import grpc

from control_plane import ca as ca_mod
from control_plane.ca import CertificateAuthority
from protos.mesh.v1 import control_pb2 as pb

log = logging.getLogger("mesh.control_plane.rotation")

IDLE = "IDLE"
BUNDLE_BOTH = "BUNDLE_BOTH"
REISSUE = "REISSUE"
DROP_OLD = "DROP_OLD"
DONE = "DONE"
PHASES = (IDLE, BUNDLE_BOTH, REISSUE, DROP_OLD, DONE)
ACTIVE = frozenset({BUNDLE_BOTH, REISSUE, DROP_OLD})
_NEXT = {BUNDLE_BOTH: REISSUE, REISSUE: DROP_OLD, DROP_OLD: DONE}
STATE_FILE = "rotation.json"
MAX_BEHIND_NAMED = 5          # instances named in a stuck phase's error

Key = tuple[str, str]         # (service, instance id), as the registry keys instances


class RotationError(Exception):
    """A rotation cannot start: ``code`` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RotationSettings:
    """Timers of a rotation, in seconds."""

    phase_timeout_s: float = 600.0
    """A phase not done by then sets ``error`` (the rotation keeps waiting)."""
    min_phase_s: float = 5.0
    """Each phase lasts at least this long (sidecars joining meanwhile get its bundle)."""
    retell_s: float = 10.0
    """A sidecar still behind is told to renew again this often."""
    tick_s: float = 1.0
    """How often the manager looks when no report wakes it."""


# ---------------------------------------------------------------------- state (pure)
@dataclass(frozen=True)
class RotationState:
    """Where the last rotation is. Times are unix seconds; CAs are named by the SHA-256 of
    their certificate's DER."""

    rotation_id: str
    phase: str
    started_at: float
    phase_since: float
    old_sha256: str
    new_sha256: str
    error: str = ""

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def to_doc(self) -> dict[str, Any]:
        return {"rotation_id": self.rotation_id, "phase": self.phase,
                "started_at": self.started_at, "phase_since": self.phase_since,
                "old_sha256": self.old_sha256, "new_sha256": self.new_sha256,
                "error": self.error}

    @classmethod
    def from_doc(cls, doc: Any) -> RotationState:
        """Raises ValueError naming what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        try:
            state = cls(str(doc["rotation_id"]), str(doc["phase"]), float(doc["started_at"]),
                        float(doc["phase_since"]), str(doc["old_sha256"]),
                        str(doc["new_sha256"]), str(doc.get("error", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"missing or bad field {exc}") from None
        if state.phase not in PHASES or state.phase == IDLE:
            raise ValueError(f"phase: unknown {state.phase!r}")
        if not state.rotation_id or not state.rotation_id.replace("-", "").isalnum():
            raise ValueError("rotation_id: letters, digits and '-' only")
        return state


def new_rotation_id(now: float) -> str:
    """``YYYYMMDDhhmmss-xxxx`` (UTC, 4 random hex digits): sorts by time, safe in file names."""
    return f"{dt.datetime.fromtimestamp(now, dt.UTC):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Trust:
    """What the control plane signs with and hands out in a phase. ``signer`` signs every
    certificate; its ``bundle_pem`` is the workloads' trust bundle and its ``key_sha256``
    what new join tokens pin; ``server_roots_pem`` are the CAs whose client certificates
    the control plane's mTLS listeners accept."""

    phase: str
    signer: CertificateAuthority
    server_roots_pem: bytes

    @property
    def bundle_pem(self) -> bytes:
        return self.signer.bundle_pem

    @property
    def bundle_sha256(self) -> str:
        """SHA-256 (hex) of the bundle's PEM bytes, as sidecars report theirs."""
        return hashlib.sha256(self.signer.bundle_pem).hexdigest()


def trust_for(phase: str, old: CertificateAuthority,
              new: CertificateAuthority | None) -> Trust:
    """The trust of ``phase`` between ``old`` and ``new`` (pure; without a ``new`` CA, or
    in IDLE, ``old`` alone)."""
    if new is None or phase == IDLE:
        return Trust(phase, old, old.bundle_pem)
    both = ca_mod.join_bundles(old.chain_pem, new.chain_pem)
    if phase == BUNDLE_BOTH:
        return Trust(phase, old.view(both, new.key_sha256), both)
    if phase == REISSUE:
        return Trust(phase, new.view(both), both)
    if phase == DROP_OLD:
        return Trust(phase, new.view(new.chain_pem), both)
    return Trust(phase, new.view(new.chain_pem), new.chain_pem)


@dataclass(frozen=True)
class Goal:
    """What a sidecar must hold in a phase: the bundle (by hash) and, unless "", a
    certificate issued by this CA (by hash)."""

    bundle_sha256: str
    issuer_sha256: str


def goal_of(trust: Trust) -> Goal:
    """BUNDLE_BOTH asks for the bundle only; every other phase for the bundle and a
    certificate of the signing CA."""
    if trust.phase == BUNDLE_BOTH:
        return Goal(trust.bundle_sha256, "")
    return Goal(trust.bundle_sha256, trust.signer.sha256)


@dataclass(frozen=True)
class SidecarTrust:
    """What a sidecar reported about its identity (``Register``, ``StateReport``)."""

    key: Key
    cert_serial: str
    issuer_sha256: str
    bundle_sha256: str
    connected: bool

    @property
    def service(self) -> str:
        return self.key[0]

    @property
    def instance(self) -> str:
        return self.key[1]


def caught_up(goal: Goal, sidecar: SidecarTrust) -> bool:
    """Whether ``sidecar`` holds what ``goal`` asks for."""
    return sidecar.bundle_sha256 == goal.bundle_sha256 and (
        not goal.issuer_sha256 or sidecar.issuer_sha256 == goal.issuer_sha256)


@dataclass(frozen=True)
class Step:
    """What ``step`` decided: the next state, whether the phase advanced, and which
    sidecars to tell to renew now."""

    state: RotationState
    advanced: bool
    renew: tuple[Key, ...]


def step(state: RotationState, goal: Goal, sidecars: Iterable[SidecarTrust],
         told: Mapping[Key, float], now: float, settings: RotationSettings) -> Step:
    """One look at a rotation (pure). ``told`` holds when each sidecar was last told to
    renew in this phase. The phase advances once every connected sidecar is caught up and
    it has lasted ``min_phase_s``; else the connected sidecars behind and not told for
    ``retell_s`` are told (all of them right after a phase starts), and a phase older than
    ``phase_timeout_s`` gets an ``error`` naming who is behind."""
    if not state.active:
        return Step(state, False, ())
    behind = sorted((s for s in sidecars if s.connected and not caught_up(goal, s)),
                    key=lambda s: s.key)
    age = now - state.phase_since
    if not behind and age >= settings.min_phase_s:
        return Step(replace(state, phase=_NEXT[state.phase], phase_since=now, error=""),
                    True, ())
    renew = tuple(s.key for s in behind if now - told.get(s.key, -math.inf) >= settings.retell_s)
    error = stuck_error(state.phase, behind, age) if behind and \
        age >= settings.phase_timeout_s else ""
    return Step(replace(state, error=error), False, renew)


def stuck_error(phase: str, behind: list[SidecarTrust], age_s: float) -> str:
    """One line: the phase, how long it has waited and who is behind (the first few)."""
    what = {BUNDLE_BOTH: "the two-CA trust bundle", REISSUE: "a certificate of the new CA",
            DROP_OLD: "the new CA alone as trust bundle"}.get(phase, "what the phase asks for")
    names = ", ".join(f"{s.service}/{s.instance}" for s in behind[:MAX_BEHIND_NAMED])
    more = f" and {len(behind) - MAX_BEHIND_NAMED} more" if len(behind) > MAX_BEHIND_NAMED else ""
    return (f"{phase} for {age_s:.0f}s: {len(behind)} connected sidecar(s) do not report "
            f"{what} yet: {names}{more} (told to renew every few seconds; see their logs)")


@dataclass(frozen=True)
class CaRow:
    """One CA certificate in the status."""

    sha256: str
    subject: str
    not_after_unix: int
    signing: bool
    in_bundle: bool


def ca_rows(trust: Trust, others: Iterable[CertificateAuthority]) -> list[CaRow]:
    """Every certificate of the signer's chain, of the bundle and of ``others``' chains
    (e.g. the old CA after DONE), once each, signer first."""
    in_bundle = {ca_mod.cert_sha256(c) for c in ca_mod.pem_certs(trust.bundle_pem)}
    rows: dict[str, CaRow] = {}
    pems = [trust.signer.chain_pem, trust.bundle_pem, *(o.chain_pem for o in others)]
    for pem in pems:
        for cert in ca_mod.pem_certs(pem):
            sha = ca_mod.cert_sha256(cert)
            if sha not in rows:
                rows[sha] = CaRow(sha, cert.subject.rfc4514_string(),
                                  int(cert.not_valid_after_utc.timestamp()),
                                  sha == trust.signer.sha256, sha in in_bundle)
    return list(rows.values())


# ---------------------------------------------------------------------- the CA dir
def read_state(ca_dir: Path) -> RotationState | None:
    """The rotation state in ``ca_dir`` (None: there has been none). Raises ValueError for a
    state file that cannot be read."""
    path = ca_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    try:
        return RotationState.from_doc(json.loads(text))
    except ValueError as exc:
        raise ValueError(f"{path}: not a rotation state ({exc})") from None


def write_state(ca_dir: Path, state: RotationState) -> None:
    """Write the state atomically (mode 0600)."""
    ca_mod.write_private(ca_dir / STATE_FILE,
                         (json.dumps(state.to_doc(), indent=2) + "\n").encode())


@dataclass(frozen=True)
class Restored:
    """The CAs a control plane starts with: ``old`` signs before a rotation (after DONE, the
    CA the rotation brought), ``new`` is a rotation's new CA while it runs."""

    old: CertificateAuthority
    new: CertificateAuthority | None
    state: RotationState | None
    note: str = ""
    """A warning for the operator ("" = none)."""


def restore(ca_dir: Path, trust_domain: str, load_current: Callable[[], CertificateAuthority],
            ca_cert: Path | None = None, ca_key: Path | None = None) -> Restored:
    """The CAs at start-up. Without a rotation state: ``load_current()`` (the CA dir's root,
    or the intermediate of ``ca_cert``/``ca_key``). During a rotation: the old CA from
    ``ca_cert``/``ca_key`` or the CA dir, the new one from the CA dir. After DONE: the CA
    dir (the end of the rotation finished first, when a crash interrupted it), whatever
    ``ca_cert``/``ca_key`` say. Raises ValueError naming the file or the mismatch."""
    state = read_state(ca_dir)
    if state is None:
        if ca_mod.discard_next(ca_dir):
            log.warning("removed the new CA of a rotation that never started (%s)", ca_dir)
        return Restored(load_current(), None, None)
    if state.phase == DONE:
        ca_mod.finalize_rotation(ca_dir, state.rotation_id)
        current = ca_mod.load(ca_dir / ca_mod.CA_CERT_FILE, ca_dir / ca_mod.CA_KEY_FILE,
                              trust_domain)
        if not ca_mod.admin_issued_by(ca_dir, current):  # cut short at REISSUE
            ca_mod.issue_admin(ca_dir, current, dt.datetime.now(dt.UTC))
        note = (f"--ca-cert/--ca-key are ignored: CA rotation {state.rotation_id} replaced "
                "that CA; the CA dir holds the mesh's CA now") if ca_cert else ""
        return Restored(current, None, state, note)
    old, new = ca_mod.load_rotating(ca_dir, trust_domain, ca_cert, ca_key)
    if old.sha256 != state.old_sha256 or new.sha256 != state.new_sha256:
        raise ValueError(f"{ca_dir / STATE_FILE}: rotation {state.rotation_id} is between CAs "
                         f"{state.old_sha256[:12]} and {state.new_sha256[:12]}, but the CAs "
                         f"found are {old.sha256[:12]} and {new.sha256[:12]}")
    return Restored(old, new, state)


# ---------------------------------------------------------------------- the listeners
class ServingCredentials:
    """The control plane's mTLS listeners' certificate and accepted client roots, following
    the trust without a restart: ``update`` re-issues the serving certificate when the
    signer changes and swaps the roots; grpc asks ``credentials()``' fetcher before each new
    handshake (connections already open keep theirs)."""

    def __init__(self, trust: Trust, spiffe_id: str, dns: tuple[str, ...],
                 ips: tuple[str, ...], now: Callable[[], dt.datetime],
                 ttl: dt.timedelta) -> None:
        self._spiffe_id, self._dns, self._ips = spiffe_id, dns, ips
        self._now, self._ttl = now, ttl
        self._signer_sha = ""
        self._roots = b""
        self._pair: tuple[bytes, bytes] = (b"", b"")
        self._current: tuple[int, grpc.ServerCertificateConfiguration] | None = None
        self.update(trust)

    def update(self, trust: Trust) -> None:
        """Follow ``trust`` (no-op when neither the signer nor the roots changed)."""
        signer = trust.signer
        if signer.sha256 == self._signer_sha and trust.server_roots_pem == self._roots:
            return
        if signer.sha256 != self._signer_sha:
            issued, key_pem = signer.issue_keypair(self._spiffe_id, "mesh control plane",
                                                   self._now(), self._ttl, dns=self._dns,
                                                   ips=self._ips)
            chain = issued.pem
            if signer.cert.issuer != signer.cert.subject:  # an intermediate: its chain too
                chain += signer.chain_pem
            self._pair = (key_pem, chain)
            self._signer_sha = signer.sha256
        self._roots = trust.server_roots_pem
        config = grpc.ssl_server_certificate_configuration([self._pair],
                                                           root_certificates=self._roots)
        generation = self._current[0] + 1 if self._current else 0
        self._current = (generation, config)  # one assignment: the fetchers see old or new

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for one listener (each listener gets its own)."""
        assert self._current is not None
        served = [self._current[0]]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            generation, config = self._current  # type: ignore[misc]
            if generation == served[0]:
                return None  # unchanged: grpc keeps the configuration it has
            served[0] = generation
            return config

        return grpc.dynamic_ssl_server_credentials(self._current[1], fetch,
                                                   require_client_authentication=True)


# ---------------------------------------------------------------------- the driver
class SessionLike(Protocol):
    """What the manager needs of a discovery session (``control_plane.discovery.Session``)."""

    connected: bool
    cert_serial: str
    issuer_sha256: str
    bundle_sha256: str

    @property
    def key(self) -> Key: ...

    def send(self, message: pb.ControlMessage) -> bool: ...


def trust_of(session: SessionLike) -> SidecarTrust:
    return SidecarTrust(session.key, session.cert_serial, session.issuer_sha256,
                        session.bundle_sha256, session.connected)


class RotationManager:
    """The control plane's CAs and the rotation between them.

    ``trust`` is what the control plane signs with and hands out now (``ControlPlane.ca`` is
    its signer); ``listeners`` are called with each new trust (the serving credentials).
    ``attach`` names the sessions; ``start`` runs the loop that drives a rotation; ``begin``
    starts one. With ``ca_dir`` None nothing is persisted (a rotation lives in memory)."""

    def __init__(self, restored: Restored, *, ca_dir: Path | None = None,
                 settings: RotationSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.ca_dir = ca_dir
        self.settings = settings or RotationSettings()
        self.clock = clock
        self.old = restored.old
        self.new = restored.new
        self.state = restored.state
        self.retired: list[CertificateAuthority] = []   # CAs rotated out by this process
        self.listeners: list[Callable[[Trust], None]] = []
        self._sessions: Callable[[], Iterable[SessionLike]] = list
        self._told: dict[Key, float] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.trust = trust_for(self.phase, self.old, self.new)

    @classmethod
    def in_memory(cls, ca: CertificateAuthority) -> RotationManager:
        return cls(Restored(ca, None, None))

    @property
    def phase(self) -> str:
        return self.state.phase if self.state is not None else IDLE

    def attach(self, sessions: Callable[[], Iterable[SessionLike]]) -> None:
        """Where the sidecars' sessions are (e.g. ``SessionHub.sessions``)."""
        self._sessions = sessions

    # ------------------------------------------------------------------ running
    async def start(self) -> None:
        """Start the loop (a rotation under way continues)."""
        if self._task is None:
            self._repair()
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="ca-rotation")
            if self.state is not None and self.state.active:
                log.info("CA rotation %s continues in phase %s", self.state.rotation_id,
                         self.state.phase)

    def _repair(self) -> None:
        """Redo what a crash may have cut short after the state was written: meshctl's
        ``ca.pem`` trusting both CAs, and its admin identity from the new CA once it signs."""
        if self.ca_dir is None or self.state is None or not self.state.active:
            return
        assert self.new is not None
        ca_mod.write_bundle(self.ca_dir, ca_mod.join_bundles(self.old.chain_pem,
                                                             self.new.chain_pem))
        if self.state.phase != BUNDLE_BOTH and not ca_mod.admin_issued_by(self.ca_dir,
                                                                          self.new):
            ca_mod.issue_admin(self.ca_dir, self.new,
                               dt.datetime.fromtimestamp(self.clock(), dt.UTC))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def poke(self) -> None:
        """A sidecar reported: look now (cheap when no rotation runs)."""
        if self._wake is not None and self.state is not None and self.state.active:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.tick_s)
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                log.exception("the CA rotation could not take its next step")

    def tick(self) -> None:
        """Look at the sidecars: advance the phase (maybe several, on an empty mesh), tell
        those behind to renew, note a stuck phase."""
        while self.state is not None and self.state.active:
            now = self.clock()
            sessions = {s.key: s for s in self._sessions()}
            result = step(self.state, goal_of(self.trust),
                          [trust_of(s) for s in sessions.values()], self._told, now,
                          self.settings)
            if result.advanced:
                self._enter(result.state)
                continue
            if result.state.error != self.state.error:
                if result.state.error:
                    log.warning("CA rotation %s is stuck: %s", result.state.rotation_id,
                                result.state.error)
                self.state = result.state
                self._persist()
            told = 0
            for key in result.renew:
                self._told[key] = now
                told += sessions[key].send(pb.ControlMessage(renew=pb.RenewCertificate()))
            if told:
                log.info("CA rotation %s (%s): told %d sidecar(s) to renew",
                         self.state.rotation_id, self.state.phase, told)
            return

    def _enter(self, state: RotationState) -> None:
        """Make ``state`` (a new phase) the current one: persist it (failing leaves all as it
        was: the next tick tries again), then act on it (the CA dir's part, when it fails,
        is logged and redone at the next start)."""
        if self.ca_dir is not None:
            write_state(self.ca_dir, state)
        previous = self.phase
        self.state = state
        self._told.clear()
        assert self.new is not None
        try:
            if state.phase == REISSUE and self.ca_dir is not None:
                ca_mod.issue_admin(self.ca_dir, self.new, dt.datetime.fromtimestamp(
                    self.clock(), dt.UTC))
            if state.phase == DONE and self.ca_dir is not None:
                ca_mod.finalize_rotation(self.ca_dir, state.rotation_id)
        except OSError as exc:
            log.error("CA rotation %s: the CA dir could not be updated for %s (%s); it is "
                      "redone at the next start", state.rotation_id, state.phase, exc)
        if state.phase == DONE:
            self.retired.append(self.old)
            self._apply(trust_for(DONE, self.old, self.new))
            self.old, self.new = self.new, None
        else:
            self._apply(trust_for(state.phase, self.old, self.new))
        log.info("CA rotation %s: %s -> %s (bundle %s, signing CA %s)", state.rotation_id,
                 previous, state.phase, self.trust.bundle_sha256[:12],
                 self.trust.signer.sha256[:12])

    def _apply(self, trust: Trust) -> None:
        self.trust = trust
        for listener in self.listeners:
            listener(trust)

    def _persist(self) -> None:
        if self.ca_dir is not None and self.state is not None:
            try:
                write_state(self.ca_dir, self.state)
            except OSError as exc:  # only the error changed: it is kept in memory
                log.error("CA rotation %s: could not write its state (%s)",
                          self.state.rotation_id, exc)

    # ------------------------------------------------------------------ starting one
    def begin(self, new: CertificateAuthority | None = None) -> RotationState:
        """Start a rotation to ``new`` (None: a new root made here). Raises RotationError
        (FAILED_PRECONDITION while one runs, INVALID_ARGUMENT for a CA that is already
        trusted)."""
        if self.state is not None and self.state.active:
            raise RotationError("FAILED_PRECONDITION",
                                f"CA rotation {self.state.rotation_id} is in phase "
                                f"{self.state.phase}: wait until it is DONE (meshctl ca status)")
        now = self.clock()
        rid = new_rotation_id(now)
        old = self.old
        if new is None:
            new = CertificateAuthority.create_root(old.trust_domain,
                                                   dt.datetime.fromtimestamp(now, dt.UTC),
                                                   label=rid)
        trusted = {ca_mod.cert_sha256(c) for c in ca_mod.pem_certs(self.trust.bundle_pem)}
        if new.sha256 in trusted or new.key_sha256 == old.key_sha256:
            raise RotationError("INVALID_ARGUMENT",
                                "the CA given is the one in use: a rotation needs another CA")
        state = RotationState(rid, BUNDLE_BOTH, now, now, old.sha256, new.sha256)
        if self.ca_dir is not None:
            # The files first, the state last: a crash before it leaves no rotation
            # (``restore`` removes the new CA's files), after it a whole one.
            ca_mod.write_ca(self.ca_dir, new, ca_mod.NEXT_CERT_FILE, ca_mod.NEXT_KEY_FILE)
            ca_mod.write_prev(self.ca_dir, old.chain_pem)
            write_state(self.ca_dir, state)
        self.new = new
        self.state = state
        self._told.clear()
        trust = trust_for(BUNDLE_BOTH, old, new)
        if self.ca_dir is not None:
            try:
                ca_mod.write_bundle(self.ca_dir, trust.server_roots_pem)  # meshctl trusts both
            except OSError as exc:
                log.error("CA rotation %s: could not write %s (%s); it is redone at the next "
                          "start", rid, ca_mod.CA_CERT_FILE, exc)
        self._apply(trust)
        log.info("CA rotation %s started: old CA %s, new CA %s (%s)", rid, old.sha256[:12],
                 new.sha256[:12], new.cert.subject.rfc4514_string())
        if self._wake is not None:
            self._wake.set()
        return state

    # ------------------------------------------------------------------ status
    def status(self) -> pb.GetCAStatusResponse:
        """``Admin.GetCAStatus``: the phase, the CAs, every connected sidecar and whether it
        holds what the phase asks for (in IDLE and DONE: the current bundle and signer)."""
        goal = goal_of(self.trust)
        others = [ca for ca in (self.old, self.new, *self.retired) if ca is not None]
        state = self.state
        sidecars = sorted((trust_of(s) for s in self._sessions() if s.connected),
                          key=lambda t: t.key)
        return pb.GetCAStatusResponse(
            phase=self.phase, rotation_id=state.rotation_id if state else "",
            cas=[pb.CAInfo(sha256=r.sha256, subject=r.subject, not_after_unix=r.not_after_unix,
                           signing=r.signing, in_bundle=r.in_bundle)
                 for r in ca_rows(self.trust, others)],
            sidecars=[pb.SidecarTrust(instance=t.instance, service=t.service,
                                      cert_serial=t.cert_serial, issuer_sha256=t.issuer_sha256,
                                      bundle_sha256=t.bundle_sha256,
                                      caught_up=caught_up(goal, t)) for t in sidecars],
            bundle_sha256=self.trust.bundle_sha256,
            phase_since_unix=state.phase_since if state else 0.0,
            error=state.error if state else "")
