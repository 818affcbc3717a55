"""Errors the services' logic raises, independent of gRPC's server API.

``BusinessError`` is an answer (FAILED_PRECONDITION: not enough stock, insufficient funds;
ABORTED: refused because it was cancelled before it arrived): the mesh must not retry it and
the saga compensates. The servicers turn it into that status with ``context.abort``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import TypeVar

import grpc

T = TypeVar("T")
log = logging.getLogger("demo")


class BusinessError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"BusinessError({self.code.name}, {self.message!r})"


def abort_with(context: grpc.ServicerContext, err: BusinessError) -> None:
    """Abort the call with the error's status and message (raises)."""
    context.abort(err.code, err.message)


def answer(context: grpc.ServicerContext, fn: Callable[[], T], database: str) -> T:
    """Run ``fn``; abort the call with a BusinessError's status, or UNAVAILABLE naming the
    ``database`` when SQLite fails (every write is idempotent and rolled back whole, so the
    caller may retry)."""
    try:
        return fn()
    except BusinessError as err:
        abort_with(context, err)
        raise  # unreachable: abort raises
    except sqlite3.Error as exc:
        log.error("%s database error: %s", database, exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{database} database: {exc}")
        raise
