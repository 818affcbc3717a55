"""The API gateway with the demo running (one demo shared by this module, started by
``demo up`` as a user runs it): every route transcoded, statuses mapped live (404, 400, 401,
403, 413), composition with one part failing, a rate limit answering 429 and recovering, a
config reload (good, then bad: the last good one stays), TLS, and a request through the
gateway seen in ``meshctl topology`` (gateway -> order) and in one trace with every service.

The demo's gateway serves the demo config (20 rps burst 40 a subject). Tests that need
another config start a second gateway process of their own on the same gateway sidecar.
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from demo_services.gateway.auth import DEMO_AUDIENCE, DEMO_ISSUER, demo_kid, mint_token
from demo_services.gateway.keys import demo_keys
from demo_services.launcher.up import GATEWAY_CONFIG
from tests.support import procs
from tests.support.demo import Demo, demo_env, running_demo
from tests.support.pki import CA
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(180)

Answer = tuple[int, dict[str, Any], dict[str, str]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    base = tmp_path_factory.mktemp("gateway")
    with running_demo(base, demo_env(base, rps=4, lease_s=1.5)) as d:
        yield d


def token(demo: Demo, subject: str, ttl_s: float = 600) -> str:
    private, public = demo_keys(Path(demo.env["MESH_DEMO_DIR"]) / "gateway")
    return mint_token(subject, ttl_s, private, DEMO_ISSUER, DEMO_AUDIENCE,
                      kid=demo_kid(public))


def call(url: str, method: str = "GET", body: Any = None, bearer: str | None = None,
         raw: bytes | None = None, context: ssl.SSLContext | None = None) -> Answer:
    """(status, JSON answer, headers) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15, context=context) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def gw_url(demo: Demo) -> str:
    return f"http://{demo.state.one('gateway').address}"


def new_order(customer: str = "cust-01") -> dict[str, Any]:
    return {"request_id": f"gw-{uuid.uuid4().hex}", "customer": customer,
            "items": [{"sku": "sku-apple", "quantity": 1}]}


def meshctl_json(demo: Demo, *args: str) -> Any:
    r = demo.cli("control_plane.meshctl", *args, "-o", "json", timeout_s=30)
    return json.loads(r.stdout) if r.returncode == 0 else None


def start_gateway(demo: Demo, config: Path, *extra: str) -> procs.Proc:
    """A second gateway on a free port, through the demo gateway's sidecar."""
    outbound = demo.state.one("sidecar", "gateway").outbound
    return procs.start([sys.executable, "-m", "demo_services.gateway", "serve", "--config",
                        str(config), "--listen", "127.0.0.1:0", "--outbound", outbound,
                        "--reload-interval-s", "0.1", *extra],
                       env={"MESH_DEMO_DIR": demo.env["MESH_DEMO_DIR"],
                            "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------- routes
def test_the_demo_starts_the_gateway_and_it_is_healthy(demo: Demo) -> None:
    gw = demo.state.one("gateway")
    assert gw.address == demo.env["MESH_DEMO_GATEWAY"]
    with urllib.request.urlopen(f"{gw_url(demo)}/healthz", timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "ok" and doc["config"]["path"] == str(GATEWAY_CONFIG)


def test_every_route_is_transcoded(demo: Demo) -> None:
    url, bearer = gw_url(demo), token(demo, "alice")
    body = new_order()
    status, created, headers = call(f"{url}/v1/orders", "POST", body, bearer)
    assert status == 200, created
    assert created["state"] == "CONFIRMED" and created["request_id"] == body["request_id"]
    assert created["items"] == [{"sku": "sku-apple", "quantity": "1"}]
    assert len(headers["X-Trace-Id"]) == 32
    status, again, _ = call(f"{url}/v1/orders", "POST", body, bearer)   # idempotent
    assert status == 200 and again["order_id"] == created["order_id"]

    status, got, _ = call(f"{url}/v1/orders/{created['order_id']}", bearer=bearer)
    assert status == 200 and got == created

    assert call(f"{url}/v1/orders", "POST", new_order(), bearer)[0] == 200  # a second page
    status, page, _ = call(f"{url}/v1/orders?state=CONFIRMED&page_size=1", bearer=bearer)
    assert status == 200 and len(page["orders"]) == 1 and page["next_page_token"]
    assert page["orders"][0]["state"] == "CONFIRMED"
    status, page2, _ = call(f"{url}/v1/orders?state=CONFIRMED&page_size=1&page_token="
                            f"{page['next_page_token']}", bearer=bearer)
    assert status == 200 and page2["orders"][0]["order_id"] != page["orders"][0]["order_id"]

    status, details, _ = call(f"{url}/v1/orders/{created['order_id']}/details",
                              bearer=bearer)
    assert status == 200 and details["partial"] is False, details
    assert details["order"] == created
    assert [(e["kind"], e["amount_cents"]) for e in details["payment"]["entries"]] == [
        ("CHARGE", created["amount_cents"])]
    assert [(r["sku"], r["state"]) for r in details["inventory"]["reservations"]] == [
        ("sku-apple", "RESERVED")]


def test_statuses_are_mapped_live(demo: Demo) -> None:
    url, bearer = gw_url(demo), token(demo, "bob")
    status, doc, _ = call(f"{url}/v1/orders/no-such-order", bearer=bearer)
    assert (status, doc["error"]["status"]) == (404, "NOT_FOUND"), doc
    assert "no-such-order" in doc["error"]["message"]
    status, doc, _ = call(f"{url}/v1/orders/no-such-order/details", bearer=bearer)
    assert (status, doc["error"]["status"]) == (404, "NOT_FOUND"), doc
    bad = {**new_order(), "items": []}
    status, doc, _ = call(f"{url}/v1/orders", "POST", bad, bearer)
    assert (status, doc["error"]["status"]) == (400, "INVALID_ARGUMENT"), doc
    assert "items" in doc["error"]["message"]
    status, doc, _ = call(f"{url}/v1/orders?page_token=garbage", bearer=bearer)
    assert (status, doc["error"]["status"]) == (400, "INVALID_ARGUMENT"), doc
    status, doc, _ = call(f"{url}/v1/orders", "POST", raw=b'{"customer": ', bearer=bearer)
    assert status == 400 and "not valid JSON" in doc["error"]["message"]
    status, doc, _ = call(f"{url}/v1/orders", "POST", {"customer": ["x"]}, bearer)
    assert status == 400 and "customer" in doc["error"]["message"]
    status, doc, _ = call(f"{url}/v1/orders", "POST",
                          {**new_order(), "customer": "x" * 70_000}, bearer)
    assert status == 413 and doc["error"]["code"] == 413

    status, doc, headers = call(f"{url}/v1/orders")
    assert (status, doc["error"]["status"]) == (401, "UNAUTHENTICATED")
    assert doc["error"]["message"] and headers["WWW-Authenticate"].startswith("Bearer")
    status, doc, _ = call(f"{url}/v1/orders", bearer=token(demo, "eve", ttl_s=1)[:-4] + "AAAA")
    assert status == 401, doc
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'gateway_http_requests_total{code="404",method="GET",route="get_order"}' in metrics
    assert "gateway_auth_refused_total" in metrics


def test_composition_reports_a_failing_part_in_the_body(demo: Demo) -> None:
    url, bearer = gw_url(demo), token(demo, "carol")
    status, created, _ = call(f"{url}/v1/orders", "POST", new_order(), bearer)
    assert status == 200, created
    fault = demo.cli("control_plane.meshctl", "fault", "inject", "payment", "--method",
                     "/payment.Payment/ListLedger", "--abort", "UNAVAILABLE", "--percent", "100")
    assert fault.returncode == 0, fault.stderr
    try:
        def partial() -> dict[str, Any] | None:
            st, doc, _ = call(f"{url}/v1/orders/{created['order_id']}/details", bearer=bearer)
            return doc if st == 200 and doc.get("partial") else None
        doc = procs.wait_for(partial, 30, interval_s=0.3, what="payment's part failing")
        assert doc["payment"] == {"error": {"code": 503, "status": "UNAVAILABLE",
                                            "message": doc["payment"]["error"]["message"]}}
        assert doc["order"]["order_id"] == created["order_id"]
        assert doc["inventory"]["reservations"]
    finally:
        clear = demo.cli("control_plane.meshctl", "fault", "clear", "payment")
        assert clear.returncode == 0, clear.stderr

    def whole() -> bool:
        st, doc, _ = call(f"{url}/v1/orders/{created['order_id']}/details", bearer=bearer)
        return st == 200 and doc["partial"] is False
    procs.wait_for(whole, 30, interval_s=0.3, what="payment's part back")


def test_the_demo_limit_answers_429_per_subject(demo: Demo) -> None:
    url, bearer = gw_url(demo), token(demo, "greedy")
    answers = [call(f"{url}/v1/orders/x", bearer=bearer) for _ in range(70)]
    limited = [a for a in answers if a[0] == 429]
    assert limited and len(limited) <= 70 - 40, [a[0] for a in answers]
    assert limited[0][1]["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert int(limited[0][2]["Retry-After"]) >= 1
    assert call(f"{url}/v1/orders/x", bearer=token(demo, "modest"))[0] == 404


# ----------------------------------------------------------------------------- a second gateway
@pytest.fixture
def own_config(demo: Demo, tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    shutil.copy(GATEWAY_CONFIG, path)
    text = path.read_text().replace("per_subject: {rps: 20, burst: 40}",
                                    "per_subject: {rps: 2, burst: 2}")
    path.write_text(text + """\
  - name: charge                 # not allowed by the gateway's policy: PERMISSION_DENIED
    http: POST /v1/charges
    grpc: payment.Payment/Charge
    body: true
""")
    return path


def test_a_rate_limit_answers_429_and_recovers(demo: Demo, own_config: Path) -> None:
    gw = start_gateway(demo, own_config)
    try:
        url, bearer = gw.ready["url"], token(demo, "dora")
        assert [call(f"{url}/v1/orders/x", bearer=bearer)[0] for _ in range(2)] == [404, 404]
        status, doc, headers = call(f"{url}/v1/orders/x", bearer=bearer)
        assert status == 429 and headers["Retry-After"] == "1", doc
        assert "subject" in doc["error"]["message"]
        procs.wait_for(lambda: call(f"{url}/v1/orders/x", bearer=bearer)[0] == 404, 5,
                       interval_s=0.2, what="the bucket to refill")
        status, doc, _ = call(f"{url}/v1/charges", "POST",
                              {"order_id": "o", "customer": "cust-01", "amount_cents": 1},
                              token(demo, "mallory"))
        assert (status, doc["error"]["status"]) == (403, "PERMISSION_DENIED"), doc
    finally:
        assert gw.stop() == 0


def test_a_bad_config_reload_keeps_the_last_good_one(demo: Demo, own_config: Path) -> None:
    gw = start_gateway(demo, own_config)
    try:
        url = gw.ready["url"]
        # this config allows a subject 2 rps: a subject of its own for each call
        bearer = token(demo, "erin-1")

        def health() -> dict[str, Any]:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                return json.load(r)["config"]
        assert health()["generation"] == 1
        assert call(f"{url}/v1/stock/sku-apple", bearer=bearer)[0] == 404
        own_config.write_text(own_config.read_text() + """\
  - name: stock
    http: GET /v1/stock/{sku}
    grpc: inventory.Inventory/GetStock
""")
        procs.wait_for(lambda: health()["generation"] == 2, 10, what="the good config")
        status, doc, _ = call(f"{url}/v1/stock/sku-apple", bearer=token(demo, "erin-2"))
        assert status == 200 and doc["stock"]["sku"] == "sku-apple", doc

        good = own_config.read_text()
        for bad, needle in ((good + "  - name: [\n", "not valid YAML"),
                            (good.replace("GetStock", "GetStocks"), "no method 'GetStocks'"),
                            (good.replace("demo-signing-key.pub.pem", "missing.pem"),
                             "missing.pem")):
            own_config.write_text(bad)
            procs.wait_for(lambda n=needle: n in health()["last_error"], 10,
                           what=f"the refusal ({needle})")
            assert health()["generation"] == 2
            status, doc, _ = call(f"{url}/v1/stock/sku-apple",
                                  bearer=token(demo, f"erin-{uuid.uuid4().hex}"))
            assert status == 200 and doc["stock"]["sku"] == "sku-apple", doc
        assert gw.alive
        refusals = [json.loads(line) for line in gw.stdout_lines() if '"config"' in line]
        assert any(r["config"] == "refused" for r in refusals), refusals
    finally:
        assert gw.stop() == 0


def test_tls_termination(demo: Demo, own_config: Path, pki: CA) -> None:
    cert, key = pki.issue_workload("gateway-edge")
    gw = start_gateway(demo, own_config, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert gw.ready["url"].startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(pki.ca_path))
        status, doc, _ = call(f"{gw.ready['url']}/v1/orders/none", bearer=token(demo, "tls"),
                              context=ctx)
        assert (status, doc["error"]["status"]) == (404, "NOT_FOUND")
    finally:
        assert gw.stop() == 0


# ----------------------------------------------------------------------------- mesh views
def test_a_request_through_the_gateway_shows_in_topology_and_one_trace(demo: Demo) -> None:
    url, bearer = gw_url(demo), token(demo, "frank")
    status, created, headers = call(f"{url}/v1/orders", "POST", new_order("cust-02"), bearer)
    assert status == 200 and created["state"] == "CONFIRMED", created
    trace_id = headers["X-Trace-Id"]

    def services() -> set[str]:
        doc = meshctl_json(demo, "trace", trace_id) or {}
        return {s["service"] for s in doc.get("spans", [])}
    procs.wait_for(lambda: {"gateway", "order", "payment", "inventory"} <= services(), 30,
                   interval_s=0.5, what=f"trace {trace_id} through every service")
    doc = meshctl_json(demo, "trace", trace_id)
    assert {s["trace_id"] for s in doc["spans"]} == {trace_id}
    roots = [s for s in doc["spans"] if not s.get("parent_span_id")
             or s["parent_span_id"] not in {x["span_id"] for x in doc["spans"]}]
    assert [(r["service"], r["kind"]) for r in roots] == [("gateway", "CLIENT")], roots

    def edge() -> bool:
        topo = meshctl_json(demo, "topology") or {}
        return any((e["source"], e["destination"]) == ("gateway", "order") and e["rps"] > 0
                   for e in topo.get("edges", []))
    procs.wait_for(edge, 30, interval_s=0.5, what="gateway -> order in the topology")

    log = Path(demo.state.one("gateway").log).read_text().splitlines()
    access = [json.loads(line)["access"] for line in log if line.startswith('{"access"')]
    mine = [a for a in access if a["trace_id"] == trace_id]
    assert mine and mine[0]["route"] == "create_order" and mine[0]["status"] == 200
    assert mine[0]["subject"] == "frank"
    time.sleep(0)
