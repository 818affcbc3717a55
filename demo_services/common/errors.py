"""Errors the services' logic raises, independent of gRPC's server API.

``BusinessError`` is an answer (FAILED_PRECONDITION: not enough stock, insufficient funds;
ABORTED: refused because it was cancelled before it arrived): the mesh must not retry it and
the saga compensates. The servicers turn it into that status with ``context.abort``.
"""

from __future__ import annotations

import grpc


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
