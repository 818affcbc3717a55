"""What every ``meshctl`` command shares: the admin client, the error types that become one
line on stderr, the ``-o`` option and the table/json/yaml output.

``meshctl`` (the group and its configuration commands) and ``meshctl_observe`` (traces,
trace, tap, top, topology) both import this module; neither imports the other's commands
except ``meshctl`` registering ``meshctl_observe``'s on its group.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import click
import grpc

from protos.mesh.v1 import control_pb2_grpc as pb_grpc

PROG = "meshctl"
RPC_TIMEOUT_S = 10.0
TABLE_WIDTH_NOT_TTY = 200  # characters: tables printed to a pipe or a file are not wrapped

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class MeshctlError(Exception):
    """One line for stderr."""


class RpcFailed(MeshctlError):
    """A call the control plane answered with an error (``code``)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def parse_duration(text: str) -> int:
    """'90' / '90s' / '30m' / '1h' / '7d' -> seconds. Raises ValueError."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"not a positive duration (like 90s, 30m, 1h, 7d): {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def duration_option_value(ctx: click.Context, param: click.Parameter, value: str | None
                          ) -> int | None:
    """Click callback: a ``parse_duration`` text -> seconds (``None`` stays ``None``);
    raises ``click.BadParameter`` otherwise."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def iso(unix: int) -> str:
    """Seconds since the epoch -> ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(unix: float, now: float | None = None) -> str:
    """How long ago ``unix`` (s since the epoch) was: ``42s``, ``5m``, ``3h``; ``-`` for 0."""
    if not unix:
        return "-"
    at = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    s = max(0, int(at - unix))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


class Client:
    """A channel to the control plane's API listener with meshctl's admin credentials."""

    def __init__(self, address: str, certs_dir: str) -> None:
        self.address = address
        d = Path(certs_dir)
        try:
            ca = (d / "ca.pem").read_bytes()
            cert = (d / "admin.pem").read_bytes()
            key = (d / "admin-key.pem").read_bytes()
        except OSError as exc:
            raise MeshctlError(f"cannot read admin credentials in {d}/ ({exc.strerror}: "
                               f"{exc.filename}); set --certs-dir or MESH_CERTS_DIR") from None
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        self.channel = grpc.secure_channel(address, creds)
        self.admin = pb_grpc.AdminStub(self.channel)

    def _failure(self, exc: grpc.RpcError, bare: tuple[grpc.StatusCode, ...] = ()
                 ) -> MeshctlError:
        code = exc.code()  # type: ignore[attr-defined]
        details = (exc.details() or "").splitlines()  # type: ignore[attr-defined]
        first = details[0] if details else ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return MeshctlError(f"cannot reach the control plane at {self.address} "
                                f"({code.name}: {first})")
        return RpcFailed(first if code in bare and first else f"{code.name}: {first}", code)

    def call(self, rpc: str, request: Any,
             bare: tuple[grpc.StatusCode, ...] = ()) -> Any:
        """Call ``Admin.<rpc>`` (timeout ``RPC_TIMEOUT_S``); raises ``RpcFailed`` with ``CODE:
        details`` (the details alone for a code in ``bare``), or ``MeshctlError`` when
        unreachable."""
        try:
            return getattr(self.admin, rpc)(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self._failure(exc, bare) from None

    def stream(self, rpc: str, request: Any, timeout_s: float) -> Generator[Any, None, None]:
        """The messages of the server-streaming ``Admin.<rpc>``, as they arrive, for at most
        ``timeout_s`` seconds: the deadline passing ends the stream normally (after at least
        one message; before any it means unreachable). Errors as ``call``. Closing the
        iterator early (``break``, Ctrl-C) cancels the call."""
        responses = getattr(self.admin, rpc)(request, timeout=timeout_s)
        got_one = False
        try:
            for message in responses:
                got_one = True
                yield message
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and got_one:
                return
            if code == grpc.StatusCode.CANCELLED:
                return
            raise self._failure(exc) from None
        finally:
            responses.cancel()

    def close(self) -> None:
        self.channel.close()


def client(ctx: click.Context) -> Client:
    """The admin client for this invocation (closed when the command's context closes)."""
    obj = ctx.find_root().obj
    c = Client(obj["control_plane"], obj["certs_dir"])
    ctx.call_on_close(c.close)
    return c


def table(columns: list[str], rows: list[list[str]], title: str | None = None) -> Any:
    """A borderless ``rich`` table (no I/O): one column per name, cells never wrapped."""
    from rich.table import Table

    t = Table(box=None, header_style="bold", title=title, pad_edge=False)
    for col in columns:
        t.add_column(col, no_wrap=True)
    for row in rows:
        t.add_row(*row)
    return t


def console() -> Any:
    """A ``rich`` console on stdout: the terminal's width, or ``TABLE_WIDTH_NOT_TTY`` columns
    when stdout is not a terminal (so pipes and files get whole lines)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else TABLE_WIDTH_NOT_TTY, soft_wrap=True)


def emit(ctx: click.Context, output: str, doc: Any, columns: list[str],
         rows: list[list[str]], title: str | None = None) -> None:
    """Print ``doc`` as JSON or YAML, or ``rows`` as a table under ``columns``."""
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    elif output == "yaml":
        import yaml
        click.echo(yaml.safe_dump(doc, sort_keys=False).rstrip())
    else:
        console().print(table(columns, rows, title))


output_option = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]),
                             default="table", show_default=True, help="Output format.")
