"""The control plane's API gate and audit log.

``ApiGate`` is a grpc.aio server interceptor on the API listener (and on the OTLP
receiver's, behind the same mTLS), so no RPC can forget it:

* a caller whose client certificate is revoked (``control_plane.revocation``) is refused
  every RPC (PERMISSION_DENIED): it cannot renew, open a discovery stream or administer;
* every ``mesh.v1.Admin`` RPC, present and future, is refused (PERMISSION_DENIED naming the
  caller) unless the caller is an admin identity (``spiffe://<td>/admin/<name>``);
* the actions that change the mesh (``AUDITED``: apply, delete, token.create, token.delete,
  authz.default, ca.rotate, certs.revoke, certs.renew, test.push_snapshot) are written to
  the audit log when they end, ok or not: who (the caller's SPIFFE ID, from its client
  certificate), what (the action and the object it acted on), when, and the result (``ok``
  or ``error: <STATUS>: <details>``); so are the refusals above (the action of an RPC that
  changes nothing is ``Admin.<Rpc>``; a revoked workload's refused renewal is recorded once
  per serial, since its sidecar retries in a loop). A dry-run apply changes nothing and is
  not recorded.

The log itself is the store's ``audit`` table (``Store.add_audit``/``list_audit``), newest
first, capped at ``store.MAX_AUDIT_ROWS`` entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from control_plane.revocation import peer_serial
from control_plane.store import AuditRow
from mesh_common.config import UNCHANGED

log = logging.getLogger("mesh.control_plane.audit")

ADMIN_SERVICE = "mesh.v1.Admin"
IDENTITY_SERVICE = "mesh.v1.Identity"
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000
MAX_OBJECT_NAMES = 10        # an apply's error row names at most this many documents
MAX_DESCRIBED_DOC_BYTES = 64 * 1024
MAX_RESULT_CHARS = 512
MAX_REMEMBERED_REFUSALS = 10_000  # revoked serials whose refusal was already recorded

OK = "ok"


def error_result(code: grpc.StatusCode | None, details: str) -> str:
    """The ``result`` of an action that failed: ``error: <STATUS>: <details>`` on one line."""
    name = code.name if code is not None else "UNKNOWN"
    line = " ".join(details.split())
    if len(line) > MAX_RESULT_CHARS:
        line = line[:MAX_RESULT_CHARS] + "..."
    return f"error: {name}: {line}" if line else f"error: {name}"


# ---------------------------------------------------------------------- what is audited
def _documents(request: Any) -> list[str]:
    """``Kind/name`` of an apply's documents, as far as they parse (for an error row)."""
    names: list[str] = []
    docs = list(request.documents)
    for d in docs[:MAX_OBJECT_NAMES]:
        label = f"{d.source or 'document'} #{d.index}"
        if len(d.json) <= MAX_DESCRIBED_DOC_BYTES:
            try:
                body = json.loads(d.json)
            except (ValueError, RecursionError):  # a document nested too deep parses no name
                body = None
            if isinstance(body, dict) and isinstance(body.get("kind"), str) \
                    and isinstance(body.get("name"), str):
                label = f"{body['kind'][:64]}/{body['name'][:253]}"
        names.append(label)
    if len(docs) > MAX_OBJECT_NAMES:
        names.append(f"and {len(docs) - MAX_OBJECT_NAMES} more")
    return [", ".join(names) or "(no documents)"]


def _apply(request: Any, response: Any | None) -> list[str]:
    if response is None:
        return _documents(request)
    return [f"{r.kind}/{r.name}" + (" (unchanged)" if r.action == UNCHANGED else "")
            for r in response.results] or ["(no objects)"]


def _delete(request: Any, response: Any | None) -> list[str]:
    if response is not None:
        return [f"{response.result.kind}/{response.result.name}"]
    return [f"{request.kind}/{request.name}"]


def _token_create(request: Any, response: Any | None) -> list[str]:
    if response is not None:
        return [f"token {response.token_id} for {request.service}"]
    return [f"token for {request.service!r}"]


def _token_delete(request: Any, response: Any | None) -> list[str]:
    return [f"token {request.token_id}"]


def _authz_default(request: Any, response: Any | None) -> list[str]:
    return [f"default {request.action}"]


def _ca_rotate(request: Any, response: Any | None) -> list[str]:
    to = "the given CA" if request.ca_cert_pem else "a new root"
    if response is not None and response.rotation_id:
        return [f"rotation {response.rotation_id} to {to}"]
    return [f"rotation to {to}"]


def _revoke(request: Any, response: Any | None) -> list[str]:
    named = f"instance {request.instance}" if request.instance else f"serial {request.serial}"
    if response is None or not response.serials:
        return [named]
    serials = ", ".join(response.serials)
    return [f"serial {serials}" if not request.instance else f"{named}: serial {serials}"]


def _renew(request: Any, response: Any | None) -> list[str]:
    who = f"service {request.service}" if request.service else "every sidecar"
    if response is not None:
        return [f"{who}: {len(response.instances)} sidecar(s) told"]
    return [who]


def _push(request: Any, response: Any | None) -> list[str]:
    return [f"instance {request.instance}"]


@dataclass(frozen=True)
class Audited:
    """How one Admin RPC is recorded: its ``action``, the objects it acted on (one row
    each) from the request and the response (None when it failed), and when a request
    changes nothing (``skip``: not recorded)."""

    action: str
    objects: Callable[[Any, Any | None], list[str]]
    skip: Callable[[Any], bool] = lambda request: False


AUDITED: dict[str, Audited] = {
    "ApplyConfig": Audited("apply", _apply, skip=lambda r: bool(r.dry_run)),
    "DeleteConfig": Audited("delete", _delete),
    "CreateToken": Audited("token.create", _token_create),
    "DeleteToken": Audited("token.delete", _token_delete),
    "SetAuthzDefault": Audited("authz.default", _authz_default),
    "RotateCA": Audited("ca.rotate", _ca_rotate),
    "RevokeCertificate": Audited("certs.revoke", _revoke),
    "RenewCertificates": Audited("certs.renew", _renew),
    "TestPushRawSnapshot": Audited("test.push_snapshot", _push),
}
"""Admin RPC name -> how it is recorded. Admin RPCs not named here change nothing."""


def action_of(rpc: str) -> str:
    """The audit action of Admin RPC ``rpc`` (``Admin.<rpc>`` for one that changes nothing)."""
    audited = AUDITED.get(rpc)
    return audited.action if audited is not None else f"Admin.{rpc}"


def safe_objects(audited: Audited | None, request: Any, response: Any | None) -> list[str]:
    """``audited.objects`` that never raises (a describer's bug must not fail the RPC)."""
    if audited is None or request is None:
        return [""]
    try:
        return audited.objects(request, response) or [""]
    except Exception:
        log.exception("could not describe an audited %s", audited.action)
        return ["?"]


def _skips(audited: Audited, request: Any) -> bool:
    """``audited.skip(request)``; False (record it) when the check itself fails."""
    try:
        return audited.skip(request)
    except Exception:
        log.exception("could not tell whether an %s changes anything", audited.action)
        return False


# ---------------------------------------------------------------------- the gate
Identify = Callable[[grpc.aio.ServicerContext], tuple[str, str]]
"""``(kind, uri)`` of the caller: ``kind`` is ``admin``, ``service`` or ""."""


class ApiGate(grpc.aio.ServerInterceptor):
    """Wraps every handler of the API listener (see the module's docstring).

    ``identify`` names the caller from its context; ``is_revoked(serial)`` says whether a
    client certificate is revoked; ``record(row)`` appends to the audit log (awaited before
    the RPC answers, so an action's row exists when its caller hears back); ``clock`` gives
    unix seconds."""

    def __init__(self, identify: Identify, is_revoked: Callable[[str], bool],
                 record: Callable[[AuditRow], Awaitable[None]],
                 clock: Callable[[], float]) -> None:
        self.identify = identify
        self.is_revoked = is_revoked
        self.record = record
        self.clock = clock
        self._refused_serials: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[None]] = set()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, rpc = handler_call_details.method.lstrip("/").partition("/")
        return _wrap(handler, lambda request, context, behavior: self._run(
            service, rpc, request, context, behavior))

    # ------------------------------------------------------------------ the checks
    async def _write(self, row: AuditRow) -> None:
        try:
            await self.record(row)
        except Exception:
            log.exception("could not write to the audit log: %s %s by %s: %s", row.action,
                          row.object, row.identity, row.result)

    async def _refuse(self, context: grpc.aio.ServicerContext, uri: str, action: str,
                      objects: list[str], message: str, audit: bool) -> None:
        if audit:
            now = self.clock()
            for obj in objects:
                await self._write(AuditRow(now, uri, action, obj,
                                           error_result(grpc.StatusCode.PERMISSION_DENIED,
                                                        message)))
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def _admit(self, service: str, rpc: str, request: Any,
                     context: grpc.aio.ServicerContext) -> str:
        """The caller's SPIFFE ID when it may call ``service/rpc``; else aborts."""
        kind, uri = self.identify(context)
        admin = service == ADMIN_SERVICE
        serial = peer_serial(context)
        if serial and self.is_revoked(serial):
            message = f"the certificate of {uri} (serial {serial}) is revoked"
            first = (serial, rpc) not in self._refused_serials
            if first and len(self._refused_serials) < MAX_REMEMBERED_REFUSALS:
                self._refused_serials.add((serial, rpc))
            (log.warning if first else log.debug)("refused %s/%s to %s: certificate serial %s "
                                                  "is revoked", service, rpc, uri, serial)
            if admin:
                await self._refuse(context, uri, action_of(rpc),
                                   safe_objects(AUDITED.get(rpc), request, None), message, True)
            renew = service == IDENTITY_SERVICE and rpc == "Renew"
            await self._refuse(context, uri, "certs.renew", [f"serial {serial}"],
                               message + ": it is not renewed", renew and first)
        if admin and kind != "admin":
            message = f"{uri} may not call Admin.{rpc} (admin identities only)"
            log.warning("denied Admin.%s to %s", rpc, uri)
            await self._refuse(context, uri, action_of(rpc),
                               safe_objects(AUDITED.get(rpc), request, None), message, True)
        return uri

    async def _run(self, service: str, rpc: str, request: Any,
                   context: grpc.aio.ServicerContext, behavior: Callable[[], Any]) -> Any:
        """Admit the caller, run the handler (``behavior()``: its coroutine or async
        iterator, passed through) and record what it did when it is audited."""
        uri = await self._admit(service, rpc, request, context)
        audited = AUDITED.get(rpc) if service == ADMIN_SERVICE and request is not None \
            else None
        if audited is not None and _skips(audited, request):
            audited = None
        started = behavior()
        if audited is None or not inspect.isawaitable(started):
            return started
        return self._audited(audited, uri, request, context, started)

    async def _audited(self, audited: Audited, uri: str, request: Any,
                       context: grpc.aio.ServicerContext, pending: Awaitable[Any]) -> Any:
        try:
            response = await pending
        except Exception as exc:
            code = context.code()
            details = context.details() or ""
            if isinstance(details, bytes):
                details = details.decode("utf-8", "replace")
            if code is None or code == grpc.StatusCode.OK:
                code, details = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
            await self._rows(audited, uri, request, None, error_result(code, details))
            raise
        except BaseException:  # cancelled: record it without awaiting in a cancelled task
            task = asyncio.get_running_loop().create_task(self._rows(
                audited, uri, request, None,
                "error: CANCELLED: the caller went away; it may have taken effect"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise
        code = context.code()
        if code is not None and code != grpc.StatusCode.OK:
            details = context.details() or ""
            await self._rows(audited, uri, request, None, error_result(
                code, details.decode("utf-8", "replace") if isinstance(details, bytes)
                else details))
        else:
            await self._rows(audited, uri, request, response, OK)
        return response

    async def _rows(self, audited: Audited, uri: str, request: Any, response: Any | None,
                    result: str) -> None:
        now = self.clock()
        for obj in safe_objects(audited, request, response):
            await self._write(AuditRow(now, uri, audited.action, obj, result))


Run = Callable[[Any, grpc.aio.ServicerContext, Callable[[], Any]], Awaitable[Any]]


def _wrap(handler: grpc.RpcMethodHandler, run: Run) -> grpc.RpcMethodHandler:
    """``handler`` with each call going through ``run(request, context, behavior)``, where
    ``behavior()`` starts the original handler (a coroutine for unary responses, an async
    iterator, or a coroutine writing with ``context.write``, for streamed ones)."""
    des, ser = handler.request_deserializer, handler.response_serializer

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = await run(request, context, lambda: inner_uu(request, context))
            return await started if inspect.isawaitable(started) else started

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[Any]:
            result = await run(request, context, lambda: inner_us(request, context))
            if not hasattr(result, "__aiter__"):
                await result  # a handler writing with context.write
                return
            async with _closing(result):
                async for item in result:
                    yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            started = await run(None, context, lambda: inner_su(requests, context))
            return await started if inspect.isawaitable(started) else started

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
        result = await run(None, context, lambda: inner_ss(requests, context))
        if not hasattr(result, "__aiter__"):
            await result
            return
        async with _closing(result):
            async for item in result:
                yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)


def _closing(iterator: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """Close the handler's async generator with ours (its ``finally`` runs at once)."""
    return contextlib.aclosing(iterator) if hasattr(iterator, "aclose") \
        else contextlib.nullcontext(iterator)
