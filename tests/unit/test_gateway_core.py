"""The gateway's pure logic: gRPC -> HTTP status table, route matching and transcoding,
config validation (and the watcher's keep-the-last-good rule), token buckets, and the
launcher/panel/loadgen pieces around it; plus the HTTP edge (400/413/415/404/405, /healthz,
/metrics) of an in-process gateway whose upstream is not there."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from demo_services.gateway import routes
from demo_services.gateway.config import (
    ConfigError,
    ConfigWatcher,
    GatewayConfig,
    load_config,
    parse_config,
)
from demo_services.gateway.ratelimit import RateLimiter, TokenBucket
from demo_services.gateway.routes import (
    BadRequest,
    RateLimit,
    build_request,
    error_body,
    http_status,
    resolve_method,
    to_json,
)
from demo_services.gateway.server import Gateway, metadata_value, new_traceparent
from demo_services.launcher.panel import gateway_counts
from demo_services.launcher.settings import SettingsError, from_env
from demo_services.launcher.state import DemoState, ProcessRecord
from demo_services.launcher.up import GATEWAY_CONFIG, policy_documents, stop_groups
from demo_services.loadgen.via_gateway import TokenCache, status_of
from protos.order import order_pb2

pytestmark = pytest.mark.timeout(30)

DEMO_CONFIG = GATEWAY_CONFIG.read_text()


def no_issuers(doc: Any, where: str) -> tuple[Any, ...]:
    return ("issuer",)


def cfg(text: str) -> GatewayConfig:
    return parse_config(text, "t.yaml", issuers_parser=no_issuers)


ROUTE = """
routes:
  - name: get_order
    http: GET /v1/orders/{order_id}
    grpc: order.Order/GetOrder
    auth: false
"""


# ---------------------------------------------------------------------- status mapping
@pytest.mark.parametrize("code,http", [
    ("OK", 200), ("INVALID_ARGUMENT", 400), ("FAILED_PRECONDITION", 400),
    ("OUT_OF_RANGE", 400), ("UNAUTHENTICATED", 401), ("PERMISSION_DENIED", 403),
    ("NOT_FOUND", 404), ("ABORTED", 409), ("ALREADY_EXISTS", 409),
    ("RESOURCE_EXHAUSTED", 429), ("CANCELLED", 499), ("UNKNOWN", 500), ("INTERNAL", 500),
    ("DATA_LOSS", 500), ("UNIMPLEMENTED", 501), ("UNAVAILABLE", 503),
    ("DEADLINE_EXCEEDED", 504)])
def test_grpc_status_maps_to_http_as_googles_api_design_guide(code: str, http: int) -> None:
    assert http_status(grpc.StatusCode[code]) == http


def test_every_grpc_code_has_a_mapping_and_the_error_body_names_it() -> None:
    assert set(routes.HTTP_STATUS) == set(grpc.StatusCode)
    assert error_body(404, "NOT_FOUND", "no order 'x'") == {
        "error": {"code": 404, "status": "NOT_FOUND", "message": "no order 'x'"}}


# ---------------------------------------------------------------------- route table
def test_the_demo_table_matches_each_route_and_says_404_or_405_otherwise() -> None:
    table = cfg(DEMO_CONFIG).table
    m = table.match("GET", "/v1/orders/ord-1%2Fx/details")
    assert not isinstance(m, list) and m.route.name == "order_details"
    assert m.variables == {"order_id": "ord-1/x"}
    for method, path, name in (("POST", "/v1/orders", "create_order"),
                               ("GET", "/v1/orders", "list_orders"),
                               ("GET", "/v1/orders/abc", "get_order")):
        found = table.match(method, path)
        assert not isinstance(found, list) and found.route.name == name
    assert table.match("DELETE", "/v1/orders") == ["GET", "POST"]
    assert table.match("GET", "/v1/nothing") == []
    assert table.match("GET", "/v1/orders//details") == []   # an empty variable


def test_transcoding_builds_the_request_from_body_query_and_path() -> None:
    create = resolve_method("order.Order/CreateOrder")
    req = build_request(create, {}, [], (), {"request_id": "r", "customer": "c",
                                             "items": [{"sku": "sku-apple", "quantity": 2}]})
    assert req == order_pb2.CreateOrderRequest(
        request_id="r", customer="c", items=[order_pb2.Item(sku="sku-apple", quantity=2)])
    listing = resolve_method("/order.Order/ListOrders")
    req = build_request(listing, {}, [("state", "CONFIRMED"), ("page_size", "5"),
                                      ("page_token", "")], ("state", "page_size", "page_token"),
                        None)
    assert req == order_pb2.ListOrdersRequest(state="CONFIRMED", page_size=5)
    get = resolve_method("order.Order/GetOrder")
    assert build_request(get, {"order_id": "o-1"}, [], (), None).order_id == "o-1"
    assert get.authority == "order" and listing.path == "/order.Order/ListOrders"


@pytest.mark.parametrize("body,query,needle", [
    ([1, 2], [], "expected a JSON object"),
    ({"customer": 5}, [], "customer"),
    ({"items": [{"sku": "a", "quantity": "many"}]}, [], "quantity"),
    ({"colour": "red"}, [], "colour"),
    ({}, [("limit", "3")], "'limit' not accepted"),
    ({}, [("state", "A"), ("state", "B")], "more than once"),
])
def test_bad_input_is_a_400_naming_the_problem(body: Any, query: list[tuple[str, str]],
                                               needle: str) -> None:
    create = resolve_method("order.Order/CreateOrder")
    with pytest.raises(BadRequest, match=re.escape(needle)):
        build_request(create, {}, query, ("state",), body)


def test_responses_are_proto3_json_with_every_field() -> None:
    doc = to_json(order_pb2.OrderView(order_id="o", amount_cents=5))
    assert doc["order_id"] == "o" and doc["amount_cents"] == "5" and doc["reason"] == ""


def test_unknown_or_streaming_methods_are_refused() -> None:
    for name, needle in (("order.Nope/X", "unknown gRPC service"),
                         ("order.Order/Nope", "no method"),
                         ("order.Order/WatchOrder", "streaming")):
        with pytest.raises(ValueError, match=needle):
            resolve_method(name)


# ---------------------------------------------------------------------- config
def test_the_demo_config_is_valid_with_the_demo_limits() -> None:
    c = parse_config(DEMO_CONFIG, "gateway.yaml")      # the real issuer parser
    assert c.per_subject == RateLimit(rps=20, burst=40)
    assert c.max_body_bytes == 64 * 1024
    assert [r.name for r in c.table.routes] == ["create_order", "get_order", "list_orders",
                                                "order_details"]
    details = c.table.routes[3]
    assert [p.name for p in details.parts] == ["order", "payment", "inventory"]
    assert details.primary == "order"
    assert c.issuers and c.issuers[0].issuer == "https://demo.mesh.local"


@pytest.mark.parametrize("text,needle", [
    ("routes: [", "not valid YAML"),
    ("", "empty document"),
    ("routes: []", "routes: expected a non-empty list"),
    (ROUTE + "colour: red\n", "unknown key(s) colour"),
    (ROUTE.replace("GetOrder", "GetOrdr"), "routes[0].grpc: order.Order has no method"),
    (ROUTE.replace("{order_id}", "{id}"), "{id} is not a field"),
    (ROUTE.replace("GET /v1", "FETCH /v1"), "routes[0].http"),
    (ROUTE + "    body: true\n", "routes[0].body"),
    (ROUTE + "    query: [color]\n", "'color' is not a field"),
    (ROUTE + "    timeout_s: 0\n", "routes[0].timeout_s"),
    (ROUTE + "    rate_limit: {rps: 0, burst: 1}\n", "routes[0].rate_limit.rps"),
    (ROUTE + "    rate_limit: {rps: 1, burst: 1.5}\n", "burst: expected an integer"),
    (ROUTE + "rate_limits: {per_subject: {rps: 1}}\n", "both rps and burst"),
    (ROUTE + "max_body_bytes: 0\n", "max_body_bytes"),
    (ROUTE + ROUTE.replace("routes:\n", ""), "'get_order' is used twice"),
    (ROUTE + ROUTE.replace("routes:\n", "").replace("name: get_order", "name: b")
     .replace("{order_id}", "{order_id}"), "overlaps route 'get_order'"),
    (ROUTE.replace("auth: false", "auth: true"), "issuers: required"),
    (ROUTE.replace("grpc: order.Order/GetOrder",
                   "compose: {a: order.Order/GetOrder}\n    primary: b"), "primary"),
])
def test_a_bad_config_is_refused_naming_the_field(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "t.yaml")
    assert str(exc.value).startswith("t.yaml: ") and needle in str(exc.value), exc.value


def test_issuer_problems_are_refused_through_the_auth_parser() -> None:
    bad = DEMO_CONFIG.replace("algorithms: [ES256]", "algorithms: [HS256]")
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.algorithms"):
        parse_config(bad, "t.yaml")


async def test_the_watcher_loads_a_good_change_and_keeps_the_last_good_on_a_bad_one(
        tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(ROUTE)
    loader = lambda p: load_config(p, issuers_parser=no_issuers)  # noqa: E731
    seen: list[GatewayConfig] = []

    async def on_change(c: GatewayConfig) -> None:
        if c.max_body_bytes == 7:
            raise ConfigError("t.yaml: refused by the gateway")
        seen.append(c)

    w = ConfigWatcher(path, loader(path), on_change, loader=loader)
    assert not await w.check()                          # unchanged
    path.write_text(ROUTE + "max_body_bytes: 1000\n")
    assert await w.check() and w.generation == 2 and w.current.max_body_bytes == 1000
    for bad, needle in (("routes: [", "not valid YAML"),
                        (ROUTE + "max_body_bytes: 7\n", "refused by the gateway")):
        path.write_text(bad)
        assert not await w.check()
        assert w.generation == 2 and w.current.max_body_bytes == 1000
        assert needle in w.status()["last_error"]
    path.unlink()
    assert not await w.check() and w.current.max_body_bytes == 1000
    assert "cannot read" in w.status()["last_error"]
    assert seen == [w.current]


# ---------------------------------------------------------------------- rate limits
def test_a_bucket_gives_its_burst_then_refills_at_its_rate() -> None:
    b = TokenBucket.full(RateLimit(rps=2, burst=3), now=0.0)
    for _ in range(3):
        assert b.wait_s(0.0) == 0.0
        b.take(0.0)
    assert b.wait_s(0.0) == pytest.approx(0.5)
    assert b.wait_s(0.5) == 0.0
    assert b.wait_s(-10.0) == 0.0 and b.tokens == pytest.approx(1.0)   # the clock went back
    b.refill(100.0)
    assert b.tokens == 3.0                                             # never above burst


def test_the_limiter_refuses_per_subject_and_per_route_with_retry_after() -> None:
    lim = RateLimiter(RateLimit(rps=20, burst=40))
    assert all(lim.check("alice", "r", None, 0.0).allowed for _ in range(40))
    d = lim.check("alice", "r", None, 0.0)
    assert (d.allowed, d.scope, d.retry_after_s) == (False, "subject", 1)
    assert lim.check("bob", "r", None, 0.0).allowed      # another subject has its own bucket
    assert lim.check("alice", "r", None, 0.05).allowed   # 20 rps: a token every 50 ms
    slow = RateLimit(rps=0.25, burst=1)
    assert lim.check("carol", "slow", slow, 0.0).allowed
    d = lim.check("dave", "slow", slow, 0.0)
    assert (d.allowed, d.scope, d.retry_after_s) == (False, "route", 4)
    # refused by the route: dave's own bucket kept its tokens
    assert lim._subjects["dave"].tokens == 40.0


def test_subject_buckets_are_bounded() -> None:
    lim = RateLimiter(RateLimit(rps=1, burst=1), max_subjects=3)
    for i in range(10):
        lim.check(f"s{i}", "r", None, 0.0)
    assert lim.subjects == 3


# ---------------------------------------------------------------------- bits of the server
def test_every_request_gets_a_new_sampled_traceparent() -> None:
    tp, trace_id = new_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp) and trace_id in tp
    assert new_traceparent()[1] != trace_id
    assert metadata_value("alice@example") == "alice@example"
    assert metadata_value("zoë\n") == "zo%C3%AB%0A"


@pytest.fixture
async def edge(tmp_path: Path) -> Any:
    """An in-process gateway (auth off) whose upstream port refuses connections."""
    path = tmp_path / "gw.yaml"
    path.write_text("max_body_bytes: 100\n" + ROUTE.replace("get_order", "create").replace(
        "GET /v1/orders/{order_id}", "POST /v1/orders").replace(
        "order.Order/GetOrder", "order.Order/CreateOrder") + "    body: true\n" +
        ROUTE.replace("routes:\n", ""))
    gw = Gateway(path, "127.0.0.1:1", reload_interval_s=60)
    await gw.start()
    client = TestClient(TestServer(gw.app()))
    await client.start_server()
    yield client
    await client.close()
    await gw.close()


async def test_the_edge_answers_bad_requests_with_clear_json(edge: TestClient) -> None:
    async def post(data: bytes, ctype: str = "application/json") -> tuple[int, dict]:
        r = await edge.post("/v1/orders", data=data, headers={"Content-Type": ctype})
        return r.status, await r.json()

    status, doc = await post(b"{not json")
    assert status == 400 and "not valid JSON" in doc["error"]["message"]
    assert doc["error"]["status"] == "INVALID_ARGUMENT"
    status, doc = await post(b'{"customer": 7}')
    assert status == 400 and "customer" in doc["error"]["message"]
    status, doc = await post(b'{"customer": "' + b"x" * 200 + b'"}')
    assert status == 413 and "at most 100" in doc["error"]["message"]
    status, doc = await post(b"a=1", "application/x-www-form-urlencoded")
    assert status == 415
    r = await edge.get("/v1/orders/o-1")
    assert r.status == 503 and (await r.json())["error"]["status"] == "UNAVAILABLE"
    assert r.headers["X-Trace-Id"]
    r = await edge.delete("/v1/orders")
    assert r.status == 405 and r.headers["Allow"] == "POST"
    r = await edge.get("/nope")
    assert r.status == 404 and (await r.json())["error"]["status"] == "NOT_FOUND"
    health = await (await edge.get("/healthz")).json()
    assert health["config"]["generation"] == 1 and health["config"]["routes"] == ["create",
                                                                                 "get_order"]
    text = await (await edge.get("/metrics")).text()
    assert 'gateway_http_requests_total{code="413",method="POST",route="create"} 1.0' in text
    assert 'gateway_http_requests_total{code="404",method="GET",route="unmatched"} 1.0' in text
    assert "gateway_http_request_duration_seconds_bucket" in text
    await asyncio.sleep(0)


# ---------------------------------------------------------------------- around the gateway
def test_the_launcher_knows_the_gateway() -> None:
    s = from_env({"MESH_DEMO_GATEWAY": "127.0.0.1:9999", "MESH_DEMO_VIA_GATEWAY": "1"})
    assert (s.gateway, s.via_gateway) == ("127.0.0.1:9999", True)
    assert (from_env({}).gateway, from_env({}).via_gateway) == ("127.0.0.1:8080", False)
    with pytest.raises(SettingsError, match="MESH_DEMO_GATEWAY"):
        from_env({"MESH_DEMO_GATEWAY": "8080"})
    with pytest.raises(SettingsError, match="MESH_DEMO_VIA_GATEWAY"):
        from_env({"MESH_DEMO_VIA_GATEWAY": "maybe"})
    rec = lambda role, svc: ProcessRecord(role, svc, "", 1, "", [], 0)  # noqa: E731
    st = DemoState("", "", "", "", {}, {}, 0.0, processes=[
        rec("control-plane", ""), rec("sidecar", "gateway"), rec("gateway", "gateway"),
        rec("loadgen", "loadgen"), rec("app", "order")])
    assert [[(p.role, p.service) for p in g] for g in stop_groups(st)] == [
        [("loadgen", "loadgen"), ("gateway", "gateway")], [("app", "order")],
        [("sidecar", "gateway")], [("control-plane", "")]]


def test_the_gateway_policy_allows_order_and_only_reads_of_payment_and_inventory() -> None:
    docs = [json.loads(d.json) for d in policy_documents()]
    gw = "spiffe://mesh.local/service/gateway"
    allowed: dict[str, set[str]] = {}
    for d in docs:
        for rule in d["spec"]["rules"]:
            if gw in rule["sources"]:
                allowed.setdefault(d["spec"]["service"], set()).update(rule["methods"])
    assert allowed == {
        "order": {"/order.Order/*"},
        "payment": {"/payment.Payment/GetBalance", "/payment.Payment/ListLedger",
                    "/payment.Payment/Summary"},
        "inventory": {"/inventory.Inventory/GetStock", "/inventory.Inventory/ListReservations",
                      "/inventory.Inventory/Summary"}}


def test_the_panel_reads_the_gateways_counts() -> None:
    text = "\n".join([
        '# TYPE gateway_http_requests_total counter',
        'gateway_http_requests_total{code="200",method="GET",route="a"} 5.0',
        'gateway_http_requests_total{code="429",method="GET",route="a"} 2.0',
        'gateway_http_requests_total{code="503",method="GET",route="a"} 1.0',
        '# TYPE gateway_rate_limited_total counter',
        'gateway_rate_limited_total{route="a",scope="subject"} 2.0', ""])
    assert gateway_counts(text) == {"requests": 8.0, "2xx": 5.0, "4xx": 2.0, "5xx": 1.0,
                                    "rate_limited": 2.0, "auth_refused": 0.0}


def test_the_load_generator_reads_gateway_errors_as_grpc_statuses() -> None:
    body = json.dumps(error_body(429, "RESOURCE_EXHAUSTED", "slow down")).encode()
    assert status_of(429, body) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
    assert status_of(503, b"<html>")[0] == grpc.StatusCode.UNAVAILABLE
    assert status_of(418, b"")[0] == grpc.StatusCode.UNKNOWN
    minted: list[str] = []
    now = [0.0]
    cache = TokenCache(lambda s, ttl: minted.append(s) or f"t{len(minted)}",
                       clock=lambda: now[0])
    assert cache.get("a") == cache.get("a") == "t1" and cache.get("b") == "t2"
    now[0] = 3500.0                                         # close to expiry: renewed
    assert cache.get("a") == "t3"
