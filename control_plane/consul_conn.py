"""Reaching Consul: the ``consul://HOST:PORT`` / ``consuls://HOST:PORT`` URLs the control
plane takes, the settings Consul's own clients read from the environment, a py-consul client
built from them, and blocking queries that follow ``X-Consul-Index``.

The environment, as Consul's CLI and its Go API client read it (``api.DefaultConfig``):

* ``CONSUL_HTTP_TOKEN`` (or, when it is unset, the file named by
  ``CONSUL_HTTP_TOKEN_FILE``): the ACL token sent with every request.
* With ``consuls://`` (HTTPS) only: ``CONSUL_CACERT`` (a PEM file of CAs to trust) or
  ``CONSUL_CAPATH`` (a directory of them, as ``c_rehash`` leaves it; the file wins when both
  are set), ``CONSUL_CLIENT_CERT`` and ``CONSUL_CLIENT_KEY`` (a client certificate, both or
  neither), ``CONSUL_HTTP_SSL_VERIFY`` (a Go boolean: ``false`` turns certificate
  verification off, for tests only). Without a CA the system's trust store is used.
* Not supported: ``CONSUL_TLS_SERVER_NAME`` (requests cannot override the name checked; a
  warning says it is ignored) and unix-socket addresses. The URL's scheme decides between
  HTTP and HTTPS (``CONSUL_HTTP_SSL`` is not read: the URL says it).

Blocking queries follow Consul's documentation (api-docs/features/blocking, "Implementation
details"): send the last ``X-Consul-Index`` with ``?index=&wait=``; an index lower than the
one sent means the state went backwards (a restore, a restarted dev agent) and the loop
starts over from 0; an index below 1 is taken as 1; a woken query is no proof of a change;
loops pause a little between queries (``MIN_QUERY_INTERVAL_S``).

Everything here but ``connect`` and ``read_token_file`` is pure.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import consul
import consul.std
import requests
from consul.exceptions import ACLPermissionDenied, BadRequest, ConsulException, NotFound

log = logging.getLogger("mesh.control_plane.consul")

SCHEMES = {"consul": "http", "consuls": "https"}
"""URL scheme -> the HTTP scheme py-consul speaks."""
DEFAULT_PORTS = {"http": 8500, "https": 8501}
"""Consul's default HTTP and HTTPS ports, used when the URL names none."""
DEFAULT_TIMEOUT_S = 5.0
"""How long one request may take to connect or answer (a blocking query adds its wait)."""
MIN_QUERY_INTERVAL_S = 0.1
"""The least time between two blocking queries of one loop (the docs ask loops to rate limit)."""
MAX_WAIT_S = 600.0
"""Consul caps a blocking query's wait at 10 minutes."""

T = TypeVar("T")


class ConsulConfigError(ValueError):
    """A Consul URL or environment setting that cannot be used (the message says which)."""


@dataclass(frozen=True)
class ConsulTarget:
    """Where and how to reach one Consul agent. ``verify`` is True (the system's CAs), False
    (no verification) or the path of a CA file or directory; ``cert`` the client certificate
    and key files, or None. The token never appears in ``repr``."""

    scheme: str
    host: str
    port: int
    token: str | None = field(default=None, repr=False)
    verify: bool | str = True
    cert: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        """``consul://HOST:PORT`` or ``consuls://HOST:PORT`` (no secrets)."""
        scheme = "consuls" if self.scheme == "https" else "consul"
        return f"{scheme}://{_join_host(self.host)}:{self.port}"

    @property
    def base_uri(self) -> str:
        """``http(s)://HOST:PORT``, what py-consul prefixes every path with."""
        return f"{self.scheme}://{_join_host(self.host)}:{self.port}"


def _join_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_registry_url(text: str) -> ConsulTarget:
    """``consul://HOST[:PORT]`` (HTTP) or ``consuls://HOST[:PORT]`` (HTTPS) as a target without
    token or TLS settings; the port defaults to 8500 (HTTP) or 8501 (HTTPS); IPv6 hosts go in
    brackets. Raises ConsulConfigError naming what is wrong (no path, query, or user info)."""
    raw = text.strip()
    scheme_name, sep, rest = raw.partition("://")
    if not sep or scheme_name.lower() not in SCHEMES:
        raise ConsulConfigError(
            f"{text!r}: a Consul address is consul://HOST:PORT or consuls://HOST:PORT (HTTPS)")
    scheme = SCHEMES[scheme_name.lower()]
    if rest.endswith("/"):
        rest = rest[:-1]
    if not rest or any(c in rest for c in "/?#@") or any(c.isspace() for c in rest):
        raise ConsulConfigError(f"{text!r}: only HOST:PORT may follow {scheme_name}://")
    host, port = _split_host_port(rest, text)
    return ConsulTarget(scheme, host, port if port is not None else DEFAULT_PORTS[scheme])


def _split_host_port(rest: str, text: str) -> tuple[str, int | None]:
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ConsulConfigError(f"{text!r}: unclosed [ in the host")
        host, tail = rest[1:end], rest[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConsulConfigError(f"{text!r}: {host!r} in brackets is not an IPv6 address") \
                from None
        if tail and not tail.startswith(":"):
            raise ConsulConfigError(f"{text!r}: expected :PORT after ]")
        port_text = tail[1:] if tail else None
    else:
        if rest.count(":") > 1:
            raise ConsulConfigError(f"{text!r}: put an IPv6 host in brackets: [::1]:8500")
        host, sep, port_text_raw = rest.partition(":")
        port_text = port_text_raw if sep else None
    if not host:
        raise ConsulConfigError(f"{text!r}: the host is missing")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConsulConfigError(f"{text!r}: the port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def url_from_http_addr(addr: str) -> str:
    """The registry URL for a ``CONSUL_HTTP_ADDR`` value (``HOST:PORT``, ``http://HOST:PORT``
    or ``https://HOST:PORT``, as Consul's clients take it). Raises ConsulConfigError for a
    unix socket or an address it cannot read."""
    raw = addr.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    scheme = scheme.lower()
    if scheme == "unix":
        raise ConsulConfigError(f"CONSUL_HTTP_ADDR={addr!r}: unix sockets are not supported")
    if scheme not in ("http", "https"):
        raise ConsulConfigError(f"CONSUL_HTTP_ADDR={addr!r}: the scheme must be http or https")
    target = parse_registry_url(("consuls://" if scheme == "https" else "consul://") + rest)
    return target.url


def parse_go_bool(text: str, name: str) -> bool:
    """A boolean as Go's ``strconv.ParseBool`` reads it (1 t T TRUE true True / 0 f F FALSE
    false False); raises ConsulConfigError naming ``name`` for anything else."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConsulConfigError(f"{name}={text!r} is not a boolean (true or false)")


def read_token_file(path: str) -> str:
    """The token in the file at ``path``, stripped (``CONSUL_HTTP_TOKEN_FILE``). Raises
    ConsulConfigError when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConsulConfigError(f"CONSUL_HTTP_TOKEN_FILE={path!r}: {exc.strerror or exc}") \
            from None


def target_from_env(url: str, env: Mapping[str, str],
                    read_file: Callable[[str], str] = read_token_file) -> ConsulTarget:
    """The target for ``url`` with the token and TLS settings ``env`` holds (see the module
    docstring); ``read_file`` reads ``CONSUL_HTTP_TOKEN_FILE``. Raises ConsulConfigError."""
    target = parse_registry_url(url)
    token = env.get("CONSUL_HTTP_TOKEN") or None
    if token is None and env.get("CONSUL_HTTP_TOKEN_FILE"):
        token = read_file(env["CONSUL_HTTP_TOKEN_FILE"]) or None
    verify: bool | str = True
    cert: tuple[str, str] | None = None
    if target.scheme == "https":
        ca_file, ca_path = env.get("CONSUL_CACERT", ""), env.get("CONSUL_CAPATH", "")
        if ca_file or ca_path:
            verify = ca_file or ca_path
        client_cert, client_key = env.get("CONSUL_CLIENT_CERT", ""), env.get("CONSUL_CLIENT_KEY", "")
        if bool(client_cert) != bool(client_key):
            raise ConsulConfigError("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY go together")
        if client_cert:
            cert = (client_cert, client_key)
        if env.get("CONSUL_HTTP_SSL_VERIFY"):
            if not parse_go_bool(env["CONSUL_HTTP_SSL_VERIFY"], "CONSUL_HTTP_SSL_VERIFY"):
                verify = False
        if env.get("CONSUL_TLS_SERVER_NAME"):
            log.warning("CONSUL_TLS_SERVER_NAME is not supported and is ignored: the "
                        "certificate of %s must name that host", target.host)
    return ConsulTarget(target.scheme, target.host, target.port, token, verify, cert)


def connect(target: ConsulTarget, timeout_s: float = DEFAULT_TIMEOUT_S) -> consul.Consul:
    """A py-consul client for ``target`` (no I/O until it is used). Its requests time out
    after ``timeout_s`` (plus the wait of a blocking query). The token is the target's
    only: py-consul's own reading of ``CONSUL_HTTP_TOKEN`` is overridden. Not thread-safe:
    give every thread its own."""
    client = consul.std.Consul(host=_join_host(target.host), port=target.port,
                               scheme=target.scheme, verify=target.verify, cert=target.cert,
                               token=target.token, connections_timeout=timeout_s)
    client.token = target.token
    return client


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` (from a py-consul call) means Consul cannot be used right now: no
    connection, a timeout, a 5xx, a 429 or a 403 (a token it refuses: retried, it may be
    fixed). False for an answer about the request itself (400, 404, other 4xx)."""
    if isinstance(exc, requests.RequestException | ACLPermissionDenied):
        return True
    if isinstance(exc, BadRequest | NotFound):
        return False
    if isinstance(exc, ConsulException):  # "<status> <body>", or an answer it could not read
        status = str(exc)[:3]
        return not status.isdigit() or status.startswith("5") or status == "429"
    return False


def go_duration(seconds: float) -> str:
    """``seconds`` as a Go duration for Consul: whole seconds as ``"10s"``, else rounded up to
    milliseconds (``"1500ms"``); at least ``"1ms"``. Raises ValueError when not finite or < 0."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and >= 0, got {seconds!r}")
    if seconds == int(seconds) and seconds >= 1:
        return f"{int(seconds)}s"
    return f"{max(1, math.ceil(seconds * 1000 - 1e-9))}ms"


@dataclass
class BlockingIndex:
    """The ``X-Consul-Index`` to send with the next blocking query on one resource (0: none,
    the query answers at once). ``resets`` counts the times the index went backwards."""

    value: int = 0
    resets: int = 0

    def advance(self, returned: object) -> bool:
        """Take the index an answer carried (``returned``: its ``X-Consul-Index``, str or int;
        missing or unreadable counts as 0). Returns True when the answer may hold news: the
        first answer, a reset, or a new index. An index below 1 is taken as 1 (the docs'
        sanity check); then one lower than the index sent resets to 0 (start over);
        otherwise it is the next index."""
        try:
            new = max(int(str(returned)), 1)
        except ValueError:
            new = 1
        previous = self.value
        if new < previous:
            self.value = 0
            self.resets += 1
            return True
        self.value = new
        return previous == 0 or new != previous


Fetch = Callable[[int | None, str | None], tuple[Any, T]]
"""``fetch(index, wait)`` -> ``(X-Consul-Index, data)``: one py-consul read, e.g.
``lambda i, w: client.health.service(name, index=i, wait=w)``; ``index`` None = no blocking."""


def blocking_get(fetch: Fetch[T], index: BlockingIndex, wait_s: float) -> tuple[T, bool]:
    """One round of a blocking-query loop: read with ``index`` (blocking up to ``wait_s``
    seconds when it is not 0, capped at Consul's 10 minutes) and advance it. Returns
    ``(data, news)``, ``news`` as ``BlockingIndex.advance`` says. Raises what ``fetch``
    raises (the index is unchanged then). Blocking I/O: run it off the event loop, and pause
    ``MIN_QUERY_INTERVAL_S`` between rounds."""
    sent = index.value
    wait = go_duration(min(wait_s, MAX_WAIT_S)) if sent else None
    returned, data = fetch(sent or None, wait)
    return data, index.advance(returned)


def environ() -> Mapping[str, str]:
    """This process's environment (the default for ``target_from_env``)."""
    return os.environ
