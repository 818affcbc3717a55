"""control_plane.consul_conn: Consul URLs, the environment Consul's own clients read, the
client built from them, and the index rules of blocking queries (Consul's api-docs,
features/blocking, "Implementation details")."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator

import consul
import pytest
import requests
from consul.exceptions import (
    ACLPermissionDenied,
    BadRequest,
    ClientError,
    ConsulException,
    NotFound,
)
from urllib3.exceptions import InsecureRequestWarning

from control_plane.consul_conn import (
    BlockingIndex,
    ConsulConfigError,
    ConsulTarget,
    blocking_get,
    connect,
    go_duration,
    is_outage,
    parse_go_bool,
    parse_registry_url,
    target_from_env,
    url_from_http_addr,
)
from tests.support.pki import CA

pytestmark = pytest.mark.timeout(10)


# -- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "scheme", "host", "port"), [
    ("consul://127.0.0.1:8500", "http", "127.0.0.1", 8500),
    ("consul://consul.service:18500/", "http", "consul.service", 18500),
    ("consuls://10.0.0.7:8501", "https", "10.0.0.7", 8501),
    ("CONSUL://h:1", "http", "h", 1),
    ("consul://[::1]:8500", "http", "::1", 8500),
    ("consul://localhost", "http", "localhost", 8500),
    ("consuls://localhost", "https", "localhost", 8501),
    ("consuls://[fe80::1]", "https", "fe80::1", 8501),
])
def test_registry_urls_name_scheme_host_and_port(url: str, scheme: str, host: str,
                                                 port: int) -> None:
    t = parse_registry_url(url)
    assert (t.scheme, t.host, t.port) == (scheme, host, port)
    assert t.token is None and t.verify is True and t.cert is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8500", "127.0.0.1:8500", "consul://", "consul://:8500",
    "consul://h:0", "consul://h:65536", "consul://h:port", "consul://h:8500/v1",
    "consul://h:8500?dc=x", "consul://user@h:8500", "consul://::1:8500", "consul://[::1",
    "consul://[nothex]:1", "consul://[::1]x", "consul://h 1:8500", "embedded",
])
def test_bad_registry_urls_are_refused_with_the_reason(url: str) -> None:
    with pytest.raises(ConsulConfigError, match="consul|host|port|bracket|IPv6|HOST"):
        parse_registry_url(url)


def test_target_url_round_trips_and_hides_the_token() -> None:
    t = ConsulTarget("https", "::1", 8501, token="s3cret")
    assert t.url == "consuls://[::1]:8501" and t.base_uri == "https://[::1]:8501"
    assert parse_registry_url(t.url).host == "::1"
    assert "s3cret" not in repr(t)


@pytest.mark.parametrize(("addr", "url"), [
    ("127.0.0.1:8500", "consul://127.0.0.1:8500"),
    ("http://127.0.0.1:8500", "consul://127.0.0.1:8500"),
    ("https://consul.example:8501", "consuls://consul.example:8501"),
    ("HTTP://[::1]:8500", "consul://[::1]:8500"),
])
def test_consul_http_addr_becomes_a_registry_url(addr: str, url: str) -> None:
    assert url_from_http_addr(addr) == url


@pytest.mark.parametrize("addr", ["unix:///var/run/consul.sock", "ftp://h:1", "h:1/x"])
def test_consul_http_addr_that_cannot_be_used_is_refused(addr: str) -> None:
    with pytest.raises(ConsulConfigError):
        url_from_http_addr(addr)


# -- the environment -------------------------------------------------------------------------


def test_token_comes_from_consul_http_token_then_its_file() -> None:
    assert target_from_env("consul://h:1", {"CONSUL_HTTP_TOKEN": "t1"}).token == "t1"
    read: list[str] = []

    def reader(path: str) -> str:
        read.append(path)
        return "t2"

    t = target_from_env("consul://h:1", {"CONSUL_HTTP_TOKEN_FILE": "/run/tok"}, reader)
    assert t.token == "t2" and read == ["/run/tok"]
    both = {"CONSUL_HTTP_TOKEN": "t1", "CONSUL_HTTP_TOKEN_FILE": "/run/tok"}
    assert target_from_env("consul://h:1", both, reader).token == "t1"
    assert target_from_env("consul://h:1", {"CONSUL_HTTP_TOKEN": ""}).token is None


def test_unreadable_token_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConsulConfigError, match="CONSUL_HTTP_TOKEN_FILE"):
        target_from_env("consul://h:1", {"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "none")})
    (tmp_path / "tok").write_text("  abc\n")
    assert target_from_env("consul://h:1",
                           {"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "tok")}).token == "abc"


def test_tls_settings_apply_to_https_as_consul_clients_read_them() -> None:
    env = {"CONSUL_CACERT": "/etc/consul/ca.pem", "CONSUL_CAPATH": "/etc/consul/cas",
           "CONSUL_CLIENT_CERT": "/etc/consul/c.pem", "CONSUL_CLIENT_KEY": "/etc/consul/k.pem"}
    t = target_from_env("consuls://h:8501", env)
    assert t.verify == "/etc/consul/ca.pem"  # the file wins over the directory
    assert t.cert == ("/etc/consul/c.pem", "/etc/consul/k.pem")
    assert target_from_env("consuls://h:8501", {"CONSUL_CAPATH": "/cas"}).verify == "/cas"
    assert target_from_env("consuls://h:8501", {}).verify is True
    off = target_from_env("consuls://h:8501", {**env, "CONSUL_HTTP_SSL_VERIFY": "false"})
    assert off.verify is False
    on = target_from_env("consuls://h:8501", {**env, "CONSUL_HTTP_SSL_VERIFY": "1"})
    assert on.verify == "/etc/consul/ca.pem"


def test_tls_settings_do_not_apply_to_plain_http() -> None:
    env = {"CONSUL_CACERT": "/ca.pem", "CONSUL_CLIENT_CERT": "/c.pem",
           "CONSUL_HTTP_SSL_VERIFY": "false"}
    t = target_from_env("consul://h:8500", env)
    assert (t.scheme, t.verify, t.cert) == ("http", True, None)


def test_client_cert_and_key_go_together() -> None:
    with pytest.raises(ConsulConfigError, match="go together"):
        target_from_env("consuls://h:1", {"CONSUL_CLIENT_CERT": "/c.pem"})
    with pytest.raises(ConsulConfigError, match="go together"):
        target_from_env("consuls://h:1", {"CONSUL_CLIENT_KEY": "/k.pem"})


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True),
    ("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False),
    ("False", False),
])
def test_go_booleans(text: str, value: bool) -> None:
    assert parse_go_bool(text, "X") is value


@pytest.mark.parametrize("text", ["yes", "no", "on", "", "tRUE", "2"])
def test_not_a_go_boolean_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ConsulConfigError, match="CONSUL_HTTP_SSL_VERIFY"):
        target_from_env("consuls://h:1", {"CONSUL_HTTP_SSL_VERIFY": text or "maybe"})


def test_tls_server_name_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    t = target_from_env("consuls://h:1", {"CONSUL_TLS_SERVER_NAME": "consul.internal"})
    assert t.verify is True
    assert "CONSUL_TLS_SERVER_NAME is not supported" in caplog.text


# -- the client ------------------------------------------------------------------------------


def test_client_uses_the_targets_token_scheme_and_tls_not_py_consuls_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "true")
    c = connect(ConsulTarget("https", "::1", 8501, token="mine", verify=False,
                             cert=("/c.pem", "/k.pem")), timeout_s=2.5)
    assert isinstance(c, consul.Consul)
    assert c.token == "mine" and c.prepare_headers() == {"X-Consul-Token": "mine"}
    assert c.http.base_uri == "https://[::1]:8501"
    assert c.http.verify is False and c.http.cert == ("/c.pem", "/k.pem")
    assert c.http.connections_timeout == 2.5
    anonymous = connect(ConsulTarget("http", "h", 8500))
    assert anonymous.prepare_headers() == {}


@pytest.mark.parametrize(("exc", "outage"), [
    (requests.ConnectionError("refused"), True),
    (requests.Timeout("slow"), True),
    (ACLPermissionDenied("ACL not found"), True),
    (ConsulException("500 rpc error: No cluster leader"), True),
    (ConsulException("503 unavailable"), True),
    (ClientError("429 rate limit exceeded"), True),
    (ConsulException("Failed to decode JSON: <html>"), True),
    (BadRequest("400 Invalid Service Meta"), False),
    (NotFound("404"), False),
    (ClientError("405 method not allowed"), False),
    (ValueError("a bug"), False),
])
def test_outages_are_told_from_answers_about_the_request(exc: BaseException,
                                                         outage: bool) -> None:
    assert is_outage(exc) is outage


# -- blocking queries ------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (10, "10s"), (1.0, "1s"), (600, "600s"), (0.5, "500ms"), (1.5, "1500ms"),
    (0.0001, "1ms"), (0, "1ms"), (2.0005, "2001ms"),
])
def test_go_durations(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_durations(bad: float) -> None:
    with pytest.raises(ValueError):
        go_duration(bad)


def test_first_answer_is_news_and_the_index_follows_x_consul_index() -> None:
    ix = BlockingIndex()
    assert ix.advance("17") is True and ix.value == 17
    assert ix.advance("17") is False and ix.value == 17   # woken without a change
    assert ix.advance(18) is True and ix.value == 18
    assert ix.resets == 0


def test_index_that_goes_backwards_resets_to_zero() -> None:
    ix = BlockingIndex(value=500)
    assert ix.advance("12") is True
    assert ix.value == 0 and ix.resets == 1   # the next query answers at once: start over
    assert ix.advance("12") is True and ix.value == 12


@pytest.mark.parametrize("returned", ["0", 0, "-3", None, "", "garbage"])
def test_index_below_one_is_taken_as_one(returned: object) -> None:
    ix = BlockingIndex()
    assert ix.advance(returned) is True
    assert ix.value == 1
    assert ix.advance(returned) is False and ix.value == 1   # no reset loop on 0 either


def test_blocking_get_sends_no_index_first_then_the_last_one_with_the_wait() -> None:
    answers = iter([("5", ["a"]), ("5", ["a"]), ("9", ["b"]), ("2", ["c"]), ("3", ["d"])])
    sent: list[tuple[int | None, str | None]] = []

    def fetch(index: int | None, wait: str | None) -> tuple[str, list[str]]:
        sent.append((index, wait))
        return next(answers)

    ix = BlockingIndex()
    got = [blocking_get(fetch, ix, 2.5) for _ in range(5)]
    assert got == [(["a"], True), (["a"], False), (["b"], True), (["c"], True), (["d"], True)]
    assert sent == [(None, None), (5, "2500ms"), (5, "2500ms"), (9, "2500ms"), (None, None)]
    assert ix.value == 3 and ix.resets == 1


def test_blocking_get_caps_the_wait_at_ten_minutes_and_keeps_the_index_on_error() -> None:
    ix = BlockingIndex(value=40)
    sent: list[str | None] = []

    def fetch(index: int | None, wait: str | None) -> tuple[str, None]:
        sent.append(wait)
        raise requests.ConnectionError("down")

    with pytest.raises(requests.ConnectionError):
        blocking_get(fetch, ix, 3600)
    assert sent == ["600s"] and ix.value == 40


# -- TLS on loopback: the settings reach the handshake ----------------------------------------


class _AgentServices(http.server.BaseHTTPRequestHandler):
    tokens: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).tokens.append(self.headers.get("X-Consul-Token"))
        body = json.dumps({"web-1": {"ID": "web-1", "Service": "web"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_agent(pki: CA) -> Iterator[tuple[int, CA]]:
    """An HTTPS server on 127.0.0.1 answering GETs as /v1/agent/services; client
    certificates of ``pki`` required (as Consul with verify_incoming)."""
    server_cert = pki.issue_workload("consul-server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_cert.cert, server_cert.key)
    ctx.load_verify_locations(pki.ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AgentServices)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _AgentServices.tokens = []
    yield httpd.server_address[1], pki
    httpd.shutdown()
    httpd.server_close()


def test_https_with_ca_client_certificate_and_token_from_the_environment(
        https_agent: tuple[int, CA]) -> None:
    port, pki = https_agent
    client_cert = pki.issue_workload("control-plane")
    env = {"CONSUL_CACERT": str(pki.ca_path), "CONSUL_CLIENT_CERT": str(client_cert.cert),
           "CONSUL_CLIENT_KEY": str(client_cert.key), "CONSUL_HTTP_TOKEN": "tls-token"}
    c = connect(target_from_env(f"consuls://127.0.0.1:{port}", env))
    assert c.agent.services()["web-1"]["Service"] == "web"
    assert _AgentServices.tokens == ["tls-token"]

    no_client_cert = {k: v for k, v in env.items() if not k.startswith("CONSUL_CLIENT")}
    with pytest.raises(requests.RequestException) as refused:
        connect(target_from_env(f"consuls://127.0.0.1:{port}", no_client_cert)).agent.services()
    assert is_outage(refused.value)

    system_cas = {k: v for k, v in env.items() if k != "CONSUL_CACERT"}
    with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed"):
        connect(target_from_env(f"consuls://127.0.0.1:{port}", system_cas)).agent.services()
    unverified = {**system_cas, "CONSUL_HTTP_SSL_VERIFY": "false"}
    with pytest.warns(InsecureRequestWarning):
        assert connect(target_from_env(f"consuls://127.0.0.1:{port}",
                                       unverified)).agent.services()
