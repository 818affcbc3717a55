"""How a demo service calls another: through its own sidecar's outbound port (h2c, loopback)
with the target service's name as ``:authority``; the sidecar does discovery, mTLS and the
rest. The serving call's ``traceparent`` is forwarded. ``direct_channel`` is the same call
without the mesh (plaintext straight to the replicas), for comparing the two."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from .tracing import ClientTraceInterceptor

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _options(service: str) -> list[tuple[str, str | int]]:
    return [
        ("grpc.default_authority", service),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),  # retries are the mesh's job
        # The sidecar is on loopback: after it was away, try again within a second or two
        # (grpc's default backoff grows to 120 s and would hold sagas up long after).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def outbound_channel(outbound: str, service: str) -> grpc.Channel:
    """A channel to ``service`` through the sidecar listening on ``outbound`` (HOST:PORT)."""
    channel = grpc.insecure_channel(outbound, options=_options(service))
    return grpc.intercept_channel(channel, ClientTraceInterceptor())


def direct_channel(addresses: Sequence[str], service: str) -> grpc.Channel:
    """A plaintext channel straight to ``service``'s replicas at ``addresses`` (HOST:PORT;
    IPv4 literals when more than one), round robin over them, without a sidecar: the same
    options and ``traceparent`` forwarding as ``outbound_channel``, but no mTLS, discovery,
    retries or policy. For running the services without the mesh (the saga bench's direct
    wiring). Raises ValueError for an empty list."""
    if not addresses:
        raise ValueError(f"{service}: no address")
    target = addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)
    channel = grpc.insecure_channel(target, options=[
        *_options(service), ("grpc.lb_policy_name", "round_robin")])
    return grpc.intercept_channel(channel, ClientTraceInterceptor())
