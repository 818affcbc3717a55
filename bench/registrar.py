"""``python -m bench.registrar --tokens FILE --per-service N``: real registrations, no sidecars.

For the bench's "100 endpoints known" figure: instances that the control plane registers and
puts into every sidecar's snapshot, without a sidecar process each. For every service in
``FILE`` (JSON ``{service: join token}``) it joins the mesh as a workload would (a P-256 key
in memory, a CSR for ``spiffe://<trust domain>/service/<service>``, the token's HMAC proof,
the answer's MAC and CA pin checked) and opens ``N`` discovery streams with that identity,
one per instance (``<service>-<i>``): each sends ``Register`` (health SERVING, its inbound
address: a socket this process listens on and never accepts from, so no other process owns
that address) and ACKs every snapshot pushed to it, as a sidecar does. Nobody calls these
instances: they belong to services the bench never calls.

Prints ``{"ready": {"instances": n, "services": [...]}}`` once every stream got its first
snapshot (so every instance is registered), then keeps the streams open until SIGTERM or
SIGINT. Exit 1 with one line on stderr when a join or a stream fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.jointoken import (
    ANSWER_MAC_METADATA,
    bundle_matches,
    check_answer_mac,
    join_proof,
    parse_token,
)
from mesh_common.numbers import finite_arg
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 10.0


class Identity:
    """One service's joined identity: its key, certificate and the trust bundle (PEM)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes, bundle_pem: bytes, not_after: int,
                 serial: str) -> None:
        self.key_pem = key_pem
        self.cert_pem = cert_pem
        self.bundle_pem = bundle_pem
        self.not_after = not_after
        self.serial = serial


async def join(service: str, token_text: str, trust_domain: str) -> tuple[Identity, str]:
    """Join as ``service`` with ``token_text``; returns the identity and the control plane's
    API address (from the token). Raises RuntimeError with one line when refused or when the
    answer fails its MAC or CA pin check."""
    token = parse_token(token_text)
    key = ec.generate_private_key(ec.SECP256R1())
    uri = f"spiffe://{trust_domain}/service/{service}"
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                          critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    request = pb.JoinRequest(token_id=token.token_id, csr=csr,
                             proof=join_proof(token.secret, csr), instance_id=f"{service}-bench")
    async with grpc.aio.insecure_channel(token.join_address) as channel:
        call = pb_grpc.BootstrapStub(channel).Join(request, timeout=RPC_TIMEOUT_S)
        try:
            resp = await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"join as {service} refused: {e.code().name}: {e.details()}") from None
    mac = next((bytes(v) for k, v in (trailers or ()) if k == ANSWER_MAC_METADATA), b"")
    if not check_answer_mac(token.secret, csr, resp.certificate_pem, resp.trust_bundle_pem,
                            resp.spiffe_id, resp.otlp_endpoint, mac):
        raise RuntimeError(f"join as {service}: the answer's MAC does not match")
    if not bundle_matches(resp.trust_bundle_pem.encode(), token.ca_key_sha256):
        raise RuntimeError(f"join as {service}: the trust bundle does not carry the token's CA")
    cert = x509.load_pem_x509_certificate(resp.certificate_pem.encode())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (Identity(key_pem, resp.certificate_pem.encode(), resp.trust_bundle_pem.encode(),
                     int(cert.not_valid_after_utc.timestamp()), format(cert.serial_number, "x")),
            token.api_address)


class Instance:
    """One registered instance: its stream, the snapshots it ACKed, its listening socket."""

    def __init__(self, service: str, index: int) -> None:
        self.instance_id = f"{service}-{index:02d}"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.inbound = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.acked = 0
        self.first = asyncio.Event()

    async def run(self, stub: pb_grpc.DiscoveryStub, ident: Identity) -> None:
        """Register, then ACK every snapshot until the stream ends (RuntimeError) or the
        task is cancelled."""
        outbox: asyncio.Queue[pb.SidecarMessage] = asyncio.Queue()
        outbox.put_nowait(pb.SidecarMessage(register=pb.Register(
            instance_id=self.instance_id, inbound=self.inbound, health="SERVING",
            labels={"bench": "registrar"}, cert_not_after_unix=ident.not_after,
            cert_serial=ident.serial)))

        async def send() -> None:
            while True:
                yield await outbox.get()

        call = stub.Stream(send())  # type: ignore[arg-type]
        try:
            async for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "snapshot":
                    outbox.put_nowait(pb.SidecarMessage(ack=pb.Ack(
                        version=msg.snapshot.version, hash=msg.snapshot.hash)))
                    self.acked += 1
                    self.first.set()
                elif kind == "query":
                    outbox.put_nowait(pb.SidecarMessage(answer=pb.QueryAnswer(
                        id=msg.query.id, error="a bench registration, not a sidecar")))
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"{self.instance_id}: discovery stream failed: "
                               f"{e.code().name}: {e.details()}") from None
        raise RuntimeError(f"{self.instance_id}: the control plane ended the discovery stream")


async def serve(tokens: dict[str, str], per_service: int, trust_domain: str,
                ready_timeout_s: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    instances: list[Instance] = []
    try:
        for service, token in sorted(tokens.items()):
            ident, api = await join(service, token, trust_domain)
            creds = grpc.ssl_channel_credentials(root_certificates=ident.bundle_pem,
                                                 private_key=ident.key_pem,
                                                 certificate_chain=ident.cert_pem)
            channel = grpc.aio.secure_channel(api, creds)
            channels.append(channel)
            stub = pb_grpc.DiscoveryStub(channel)
            for i in range(1, per_service + 1):
                inst = Instance(service, i)
                instances.append(inst)
                tasks.append(asyncio.create_task(inst.run(stub, ident), name=inst.instance_id))
        waiting = asyncio.ensure_future(asyncio.wait_for(
            asyncio.gather(*(i.first.wait() for i in instances)), ready_timeout_s))
        done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            failed = next(t for t in done)
            failed.result()  # raises the stream's error
        waiting.result()  # TimeoutError when some instance never got its snapshot
        print(json.dumps({"ready": {"instances": len(instances),
                                    "services": sorted(tokens)}}), flush=True)
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if stopping not in done:
            stopping.cancel()
            next(t for t in done).result()
        return 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        for inst in instances:
            inst.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.registrar", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, required=True,
                    help="JSON file {service: join token}")
    ap.add_argument("--per-service", type=int, required=True, help="instances per service")
    ap.add_argument("--trust-domain", default="mesh.local")
    ap.add_argument("--ready-timeout-s", type=finite_arg, default=30.0)
    args = ap.parse_args(argv)
    tokens = json.loads(args.tokens.read_text())
    try:
        return asyncio.run(serve(tokens, args.per_service, args.trust_domain,
                                 args.ready_timeout_s))
    except TimeoutError:
        print(f"bench.registrar: not every instance got its first snapshot within "
              f"{args.ready_timeout_s:g} s", file=sys.stderr, flush=True)
        return 1
    except (RuntimeError, OSError, ValueError) as e:
        print(f"bench.registrar: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
