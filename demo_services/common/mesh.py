"""How a demo service calls another: through its own sidecar's outbound port (h2c, loopback)
with the target service's name as ``:authority``; the sidecar does discovery, mTLS and the
rest. The serving call's ``traceparent`` is forwarded."""

from __future__ import annotations

import grpc

from .tracing import ClientTraceInterceptor

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def outbound_channel(outbound: str, service: str) -> grpc.Channel:
    """A channel to ``service`` through the sidecar listening on ``outbound`` (HOST:PORT)."""
    channel = grpc.insecure_channel(outbound, options=[
        ("grpc.default_authority", service),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),  # retries are the mesh's job
        # The sidecar is on loopback: after it was away, try again within a second or two
        # (grpc's default backoff grows to 120 s and would hold sagas up long after).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ])
    return grpc.intercept_channel(channel, ClientTraceInterceptor())
