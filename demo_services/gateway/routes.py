"""The gateway's route table and transcoding rules, pure (no I/O).

One table maps HTTP to gRPC: each route is ``METHOD /path/{field}`` plus either one unary gRPC
method (its request built from the path's variables, the listed query parameters and, for a
route with a body, the JSON body, all through protobuf's JSON mapping) or a composition of
several methods called in parallel. The table comes from the gateway's YAML config
(``config.py``); the gRPC methods are looked up by full name in the compiled protos, so a new
route needs a config entry, not code.

gRPC status -> HTTP status follows Google's API design guide (``google/rpc/code.proto``,
AIP-193); errors answer ``{"error": {"code": <http>, "status": "<GRPC_CODE>", "message":
"..."}}``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message

PROTO_MODULES = ("protos.order.order_pb2", "protos.payment.payment_pb2",
                 "protos.inventory.inventory_pb2")
"""The compiled protos whose services routes may name (``package.Service/Method``)."""

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# Google's API design guide: https://cloud.google.com/apis/design/errors (code.proto).
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_VAR = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9._~-]+$")


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC status code (500 for one the table does not know)."""
    return HTTP_STATUS.get(code, 500)


def error_body(http: int, status: str, message: str) -> dict[str, Any]:
    """The JSON error document: ``{"error": {"code", "status", "message"}}``."""
    return {"error": {"code": http, "status": status, "message": message}}


# ------------------------------------------------------------------------- proto lookup
@dataclass(frozen=True)
class GrpcMethod:
    """A unary gRPC method: its path (``/order.Order/CreateOrder``), the mesh service it is
    reached at (``:authority``) and its message classes."""

    path: str
    authority: str
    request_cls: type[Message]
    response_cls: type[Message]

    @property
    def request_fields(self) -> frozenset[str]:
        return frozenset(f.name for f in self.request_cls.DESCRIPTOR.fields)


def _services() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PROTO_MODULES:
        module = importlib.import_module(name)
        for svc in module.DESCRIPTOR.services_by_name.values():
            out[svc.full_name] = svc
    return out


def resolve_method(name: str, authority: str | None = None) -> GrpcMethod:
    """``package.Service/Method`` (a leading ``/`` allowed) -> GrpcMethod; the authority
    defaults to the proto package's first component (``order``). Raises ValueError (one
    line) for an unknown service or method or a streaming method."""
    service, _, method = name.lstrip("/").partition("/")
    svc = _services().get(service)
    if svc is None:
        raise ValueError(f"unknown gRPC service {service!r} (known: "
                         f"{', '.join(sorted(_services()))})")
    md: MethodDescriptor | None = svc.methods_by_name.get(method)
    if md is None:
        raise ValueError(f"{service} has no method {method!r}")
    if md.client_streaming or md.server_streaming:
        raise ValueError(f"{service}/{method} is streaming; only unary methods are routed")
    return GrpcMethod(path=f"/{service}/{method}",
                      authority=authority or service.split(".", 1)[0],
                      request_cls=_message_class(md.input_type),
                      response_cls=_message_class(md.output_type))


def _message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


# -------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``rps`` tokens per second (> 0), at most ``burst`` (>= 1) saved."""

    rps: float
    burst: int


@dataclass(frozen=True)
class Part:
    """One call of a composition: the response lands under ``name`` in the merged body."""

    name: str
    method: GrpcMethod


@dataclass(frozen=True)
class Route:
    """One entry of the table. Exactly one of ``method`` (transcoding) and ``parts``
    (composition) is set. ``primary``: the part whose failure fails the whole answer (its
    status mapped); any other part's failure is reported in the body. ``timeout_s``: the
    gRPC deadline of each call (seconds)."""

    name: str
    http_method: str
    template: tuple[str, ...]            # segments; "{field}" is a variable
    method: GrpcMethod | None = None
    parts: tuple[Part, ...] = ()
    primary: str = ""
    body: bool = False
    query: tuple[str, ...] = ()
    timeout_s: float = 10.0
    rate_limit: RateLimit | None = None
    auth: bool = True

    @property
    def pattern(self) -> str:
        return "/" + "/".join(self.template)

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(m.group(1) for s in self.template if (m := _VAR.match(s)))


def parse_template(path: str) -> tuple[str, ...]:
    """``/v1/orders/{order_id}`` -> segments; raises ValueError for an empty segment, a
    repeated variable or characters outside ``[A-Za-z0-9._~-]`` in a literal."""
    if not path.startswith("/") or path == "/":
        raise ValueError(f"path must start with '/' and name something, got {path!r}")
    segments = tuple(path[1:].split("/"))
    seen: set[str] = set()
    for seg in segments:
        m = _VAR.match(seg)
        if m:
            if m.group(1) in seen:
                raise ValueError(f"variable {{{m.group(1)}}} appears twice in {path!r}")
            seen.add(m.group(1))
        elif not _LITERAL.match(seg):
            raise ValueError(f"bad path segment {seg!r} in {path!r}")
    return segments


def _match(template: Sequence[str], segments: Sequence[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    found: dict[str, str] = {}
    for t, s in zip(template, segments, strict=True):
        m = _VAR.match(t)
        if m:
            if not s:
                return None
            found[m.group(1)] = unquote(s)
        elif t != s:
            return None
    return found


@dataclass(frozen=True)
class Match:
    """A request's route and its path variables (URL-decoded)."""

    route: Route
    variables: dict[str, str]


@dataclass(frozen=True)
class RouteTable:
    """The routes, matched in order (the first whose method and path match wins)."""

    routes: tuple[Route, ...] = field(default_factory=tuple)

    def match(self, method: str, path: str) -> Match | list[str]:
        """The match, or (no route for this method) the methods allowed on ``path``: an
        empty list means no route has this path at all (404), else 405 with Allow."""
        segments = path[1:].split("/") if path.startswith("/") else []
        allowed: list[str] = []
        for route in self.routes:
            found = _match(route.template, segments)
            if found is None:
                continue
            if route.http_method == method.upper():
                return Match(route, found)
            allowed.append(route.http_method)
        return sorted(set(allowed))


# -------------------------------------------------------------------------- transcoding
class BadRequest(ValueError):
    """The request cannot become a gRPC request (one line, for a 400 body)."""


def build_request(method: GrpcMethod, variables: Mapping[str, str],
                  query: Sequence[tuple[str, str]], allowed_query: Sequence[str],
                  body: Any | None) -> Message:
    """The gRPC request of a transcoded call: the JSON ``body`` (an object, or None for a
    route without one), then the query parameters (each allowed name at most once), then the
    path variables (they win). Field names are the proto's (``order_id``) or their JSON
    names (``orderId``). Raises BadRequest naming the problem (not an object, unknown field,
    wrong type, unknown or repeated query parameter)."""
    doc: dict[str, Any] = {}
    if body is not None:
        if not isinstance(body, dict):
            raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
        doc.update(body)
    seen: set[str] = set()
    for key, value in query:
        if key not in allowed_query:
            allowed = ", ".join(allowed_query) or "none"
            raise BadRequest(f"query parameter {key!r} not accepted here (accepted: {allowed})")
        if key in seen:
            raise BadRequest(f"query parameter {key!r} given more than once")
        seen.add(key)
        if value != "":
            doc[key] = value
    doc.update(variables)
    msg = method.request_cls()
    try:
        json_format.ParseDict(doc, msg, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise BadRequest(_clean(str(exc))) from None
    except (TypeError, ValueError, AttributeError) as exc:  # odd values protobuf rejects raw
        raise BadRequest(_clean(str(exc))) from None
    return msg


def _clean(text: str) -> str:
    """The first line of protobuf's message, without its trailing dots."""
    lines = text.strip().splitlines()
    return (lines[0].rstrip(".") if lines else "") or "invalid request"


def to_json(msg: Message) -> dict[str, Any]:
    """A response message as JSON (proto field names, every field present; 64-bit integers
    are strings, as proto3's JSON mapping has it)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
