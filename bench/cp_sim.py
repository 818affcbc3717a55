"""``python -m bench.cp_sim``: many light simulated sidecars in one process, for the
control-plane bench (``bench.cp_scale``).

Each simulated sidecar joins the mesh the real way (``sidecar.dynamic.DynamicIdentity``: a key
made in memory, a CSR proven with its service's join token on the plaintext join listener, the
answer checked against the token's CA pin and MAC), so every instance has its own workload
certificate; then it opens its own mTLS channel (one TLS connection per sidecar, as real
sidecars have) and one ``Discovery/Stream`` on it, sends ``Register`` (a distinct instance id,
fake inbound/outbound/admin addresses on 127.0.0.0/8 that nobody connects to, health SERVING,
``accepts_zlib_snapshot`` set as the real sidecar sets it, so pushes come as ``json_zlib``) and
answers every ``SnapshotPush`` with an ``Ack`` of the pushed version and hash, as the real
sidecar does, without validating or applying the document (that is the sidecar's cost, not the
control plane's). It sends nothing else: no ``StateReport`` (so the control plane's
``last_seen`` of a subscriber is the arrival of its latest ACK), a short error answer to a
``Query``; other commands are ignored. A stream that fails is opened again after a
full-jitter backoff and registers again, as the real sidecar does; failures are counted by
reason.

It is driven over a control socket on 127.0.0.1 (JSON lines, one reply per command; the port
is in the ready line ``{"ready": {"control": "127.0.0.1:PORT"}}`` on stdout):

* ``{"cmd": "join", "tokens": {SERVICE: TOKEN}, "instances": [[SERVICE, ID], ...],
  "trust_domain": TD, "concurrency": K, "timeout_s": T}``: join every instance, K at a time;
  replies ``{"ok", "joined", "seconds"}``;
* ``{"cmd": "up", "timeout_s": T}``: start every subscriber at once
  and wait until each has ACKed its first snapshot; replies ``first_register_at`` (monotonic
  s, when the first ``Register`` was handed to grpc), ``last_first_ack_at`` (when the last
  subscriber's first ``Ack`` was handed to grpc), ``acked``, ``failed`` (never ACKed) and the
  stream failures so far by reason;
* ``{"cmd": "acks", "version": V, "timeout_s": T}``: wait until every subscriber has ACKed
  version V; replies ``ack_at`` (per ACKing subscriber, when its ``Ack`` of V was handed to
  grpc), ``recv_at`` (when the push of V was read), ``missing`` (how many did not ACK it in
  time) and ``missing_ids`` (the first few);
* ``{"cmd": "status"}``: connected subscribers, stream failures, snapshots received, bytes
  (of the documents as they came on the wire: compressed when they came as ``json_zlib``);
* ``{"cmd": "stop"}``: end every stream and exit.

Light: one grpc.aio process on uvloop (``--loop asyncio`` for the default loop), the same
channel options as the real sidecar's discovery channel, and each push's version and hash read
straight from its wire bytes (``parse_push``: the document is never decoded). Times are
``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the machine), in seconds.
Every wait is bounded by its ``timeout_s``. The open-files limit is raised to the hard limit
first (one TLS connection per simulated sidecar).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.jointoken import parse_token
from protos.mesh.v1 import control_pb2 as pb
from sidecar import identity as sidecar_identity
from sidecar.dynamic import DynamicIdentity

log = logging.getLogger("bench.cp_sim")

CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 16 * 1024 * 1024),
                   ("grpc.enable_retries", 0))
"""Messages up to the real sidecar's cap (``sidecar.discovery.MAX_MESSAGE_BYTES``), no
retries: as the sidecar's discovery stream."""
STREAM_METHOD = "/mesh.v1.Discovery/Stream"
POLL_S = 0.005
"""How often a wait looks at the tallies (seconds)."""
MAX_ERRORS_SHOWN = 3


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return int(soft)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return int(target)
    return int(soft)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at ``data[i:]`` and the index after it."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def parse_push(data: bytes) -> tuple[str, str, int] | None:
    """(version, hash, document bytes) of a serialized ``ControlMessage`` that is a
    ``SnapshotPush``, read straight from the wire format without decoding the document (the
    simulator never looks at it; the bytes are those of ``json`` or, compressed, of
    ``json_zlib``); None for any other message."""
    if not data or data[0] != 0x0A:  # field 1 (snapshot), length-delimited
        return None
    length, i = _varint(data, 1)
    end = i + length
    version = digest = ""
    size = 0
    while i < end:
        key, i = _varint(data, i)
        if key & 7 != 2:  # every SnapshotPush field is length-delimited
            return None
        n, i = _varint(data, i)
        field_no = key >> 3
        if field_no == 1:
            version = data[i:i + n].decode()
        elif field_no == 2:
            digest = data[i:i + n].decode()
        elif field_no in (3, 4):  # json, json_zlib
            size = n
        i += n
    return version, digest, size


def fake_address(index: int, port_base: int) -> str:
    """A distinct HOST:PORT on 127.0.0.0/8 for simulated sidecar ``index`` (never listened
    on, never connected to: only the snapshot carries it)."""
    return f"127.{1 + index // 50_000}.{(index // 250) % 200}.{1 + index % 250}:{port_base}"


@dataclass
class Subscriber:
    """One simulated sidecar: its identity, its stream's task and what it saw (monotonic s)."""

    service: str
    instance_id: str
    index: int
    identity: DynamicIdentity
    register_at: float | None = None
    first_ack_at: float | None = None
    acks: dict[str, float] = field(default_factory=dict)      # version -> Ack handed to grpc
    received: dict[str, float] = field(default_factory=dict)  # version -> push read
    version: str = ""     # the version it runs (ACKed last), sent in a new Register
    hash: str = ""
    error: str | None = None  # the last failure of its stream
    failures: int = 0
    connected: bool = False
    task: asyncio.Task[None] | None = None


class Simulator:
    """The subscribers and the commands of the control socket."""

    def __init__(self) -> None:
        self.subs: list[Subscriber] = []
        self.snapshots = 0
        self.snapshot_bytes = 0      # of the last push's document
        self.bytes_received = 0      # every push's document
        self.failures: dict[str, int] = {}  # stream failures by reason
        self.rng = random.Random()
        self.stopping = asyncio.Event()

    # ------------------------------------------------------------------ join
    async def join(self, cmd: dict[str, Any]) -> dict[str, Any]:
        # A thousand identities in one process: their key and certificate work runs here
        # (the real sidecar runs it in a helper process, which would cost a start-up each).
        sidecar_identity.runner = sidecar_identity.in_process
        tokens = {svc: parse_token(t) for svc, t in cmd["tokens"].items()}
        td = str(cmd.get("trust_domain", "mesh.local"))
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 32)))
        self.subs = [Subscriber(svc, iid, i, DynamicIdentity(tokens[svc], svc, td,
                                                             instance_id=iid, max_backoff_s=1.0))
                     for i, (svc, iid) in enumerate(cmd["instances"])]

        async def one(sub: Subscriber) -> None:
            async with sem:
                await sub.identity.join()
                sub.identity.close()  # the in-memory files: the PEMs stay on the identity

        started = time.monotonic()
        async with asyncio.timeout(float(cmd.get("timeout_s", 120))):
            await asyncio.gather(*(one(s) for s in self.subs))
        return {"ok": True, "joined": len(self.subs), "seconds": time.monotonic() - started}

    # ------------------------------------------------------------------ streams
    async def _stream(self, sub: Subscriber, api: str) -> None:
        """Keep ``sub``'s discovery stream open, as the real sidecar does: when it fails,
        reconnect after a full-jitter backoff (0.2 s doubling, capped at 5 s) and register
        again with the version it runs; every failure is counted by its reason."""
        attempt = 0
        while True:
            acked = len(sub.acks)
            try:
                await self._session(sub, api)
                error = "the control plane ended the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a bug here must show in the reply, not vanish
                error = f"{type(exc).__name__}: {exc}"
            sub.failures += 1
            sub.error = error
            self.failures[error] = self.failures.get(error, 0) + 1
            if len(sub.acks) > acked:
                attempt = 0
            await asyncio.sleep(self.rng.uniform(0.0, min(5.0, 0.2 * 2 ** attempt)))
            attempt += 1

    async def _session(self, sub: Subscriber, api: str) -> None:
        ident = sub.identity
        creds = grpc.ssl_channel_credentials(root_certificates=ident.bundle_pem,
                                             private_key=ident.key.private_pem(),
                                             certificate_chain=ident.cert_pem)
        trust = ident.trust
        register = pb.SidecarMessage(register=pb.Register(
            instance_id=sub.instance_id, inbound=fake_address(sub.index, 15006),
            outbound=fake_address(sub.index, 15001), admin=fake_address(sub.index, 15000),
            labels={"version": "v1"}, health="SERVING", version=sub.version, hash=sub.hash,
            cert_not_after_unix=ident.cert_not_after_unix, cert_serial=trust.cert_serial,
            bundle_sha256=trust.bundle_sha256, issuer_sha256=trust.issuer_sha256,
            accepts_zlib_snapshot=True))
        try:
            async with grpc.aio.secure_channel(api, creds, options=CHANNEL_OPTIONS) as channel:
                call = channel.stream_stream(STREAM_METHOD,
                                             request_serializer=pb.SidecarMessage.SerializeToString,
                                             response_deserializer=None)()
                if sub.register_at is None:
                    sub.register_at = time.monotonic()
                await call.write(register)
                sub.connected = True
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        return
                    push = parse_push(msg)
                    if push is not None:
                        version, digest, size = push
                        sub.received[version] = time.monotonic()
                        self.snapshots += 1
                        self.snapshot_bytes = size
                        self.bytes_received += size
                        now = time.monotonic()
                        await call.write(pb.SidecarMessage(ack=pb.Ack(version=version,
                                                                      hash=digest)))
                        sub.acks[version] = now
                        sub.version, sub.hash = version, digest
                        if sub.first_ack_at is None:
                            sub.first_ack_at = now
                        continue
                    other = pb.ControlMessage.FromString(msg)
                    if other.WhichOneof("msg") == "query":
                        await call.write(pb.SidecarMessage(answer=pb.QueryAnswer(
                            id=other.query.id, error="simulated sidecar: no config to show")))
        finally:
            sub.connected = False

    def _errors(self) -> dict[str, int]:
        """Stream failures so far, by reason (the most frequent few)."""
        top = sorted(self.failures.items(), key=lambda kv: -kv[1])[:MAX_ERRORS_SHOWN]
        return dict(top)

    async def up(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if not self.subs:
            return {"ok": False, "error": "join first"}
        api = self.subs[0].identity.api_address
        for sub in self.subs:
            sub.task = asyncio.create_task(self._stream(sub, api),
                                           name=f"sub {sub.instance_id}")
        deadline = time.monotonic() + float(cmd.get("timeout_s", 120))
        while time.monotonic() < deadline:
            if all(s.first_ack_at is not None for s in self.subs):
                break
            await asyncio.sleep(POLL_S)
        acked = [s for s in self.subs if s.first_ack_at is not None]
        registered = [s.register_at for s in self.subs if s.register_at is not None]
        return {"ok": True, "acked": len(acked), "failed": len(self.subs) - len(acked),
                "errors": self._errors(), "stream_failures": sum(self.failures.values()),
                "first_register_at": min(registered) if registered else None,
                "last_first_ack_at": max((s.first_ack_at for s in acked),  # type: ignore[type-var]
                                         default=None)}

    async def acks(self, cmd: dict[str, Any]) -> dict[str, Any]:
        version = str(cmd["version"])
        deadline = time.monotonic() + float(cmd.get("timeout_s", 60))
        while time.monotonic() < deadline:
            if all(version in s.acks for s in self.subs):
                break
            await asyncio.sleep(POLL_S)
        done = [s for s in self.subs if version in s.acks]
        missing = [s for s in self.subs if version not in s.acks]
        return {"ok": True, "version": version, "acked": len(done), "missing": len(missing),
                "missing_ids": [f"{s.service}/{s.instance_id}" for s in missing[:5]],
                "errors": self._errors(), "stream_failures": sum(self.failures.values()),
                "ack_at": [s.acks[version] for s in done],
                "recv_at": [s.received[version] for s in done]}

    def status(self) -> dict[str, Any]:
        return {"ok": True, "subscribers": len(self.subs),
                "connected": sum(s.connected for s in self.subs),
                "stream_failures": sum(self.failures.values()), "errors": self._errors(),
                "snapshots": self.snapshots, "snapshot_bytes": self.snapshot_bytes,
                "bytes_received": self.bytes_received}

    async def stop(self) -> dict[str, Any]:
        tasks = [s.task for s in self.subs if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.stopping.set()
        return {"ok": True}

    # ------------------------------------------------------------------ control socket
    async def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("cmd")
        try:
            if name == "join":
                return await self.join(cmd)
            if name == "up":
                return await self.up(cmd)
            if name == "acks":
                return await self.acks(cmd)
            if name == "status":
                return self.status()
            if name == "stop":
                return await self.stop()
            return {"ok": False, "error": f"unknown command {name!r}"}
        except TimeoutError:
            return {"ok": False, "error": f"{name}: timed out", "errors": self._errors()}
        except Exception as exc:
            log.exception("command %s failed", name)
            return {"ok": False, "error": f"{name}: {type(exc).__name__}: {exc}",
                    "errors": self._errors()}

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        try:
            while not self.stopping.is_set():
                line = await reader.readline()
                if not line:
                    break
                reply = await self.command(json.loads(line))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()
            if not self.stopping.is_set():  # the bench went away: end everything
                await self.stop()


async def amain() -> int:
    nofile = raise_nofile()
    sim = Simulator()
    server = await asyncio.start_server(sim.serve_client, "127.0.0.1", 0, limit=64 << 20)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"ready": {"control": f"127.0.0.1:{port}",
                                           "nofile": nofile}}) + "\n")
    sys.stdout.flush()
    async with server:
        await sim.stopping.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.cp_sim", description=__doc__.splitlines()[0])
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.loop == "uvloop":
        import uvloop
        return uvloop.run(amain())
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
