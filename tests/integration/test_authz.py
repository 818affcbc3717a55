"""Authorization with real processes: a control plane, an echo service and a store service
(echo servers behind dynamic sidecars) and four outbound-only callers (web, webhook, batch,
ops). Policies applied with ``meshctl apply`` decide every rule kind (exact, prefix and ``*``
sources; exact, prefix and ``*`` methods), DENY over ALLOW, the mesh default deny, dry-run
counting without enforcing (in the sidecars' /metrics); ``meshctl authz check`` answers
with exit codes, a denied caller hears who it is and which policy refused it, and a workload
identity can change none of it. The tests share one mesh and run in file order; each says
what it leaves behind.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_control_plane import (
    Workload,
    create_token,
    join,
    meshctl,
    mtls_channel,
)
from tests.integration.test_discovery import Mesh
from tests.support import procs

pytestmark = pytest.mark.timeout(120)

TD = "mesh.local"
CALLERS = ("web", "webhook", "batch", "ops")
UNARY, SERVER, CLIENT, BIDI = (f"/meshtest.Echo/{m}" for m in
                               ("Unary", "ServerStream", "ClientStream", "Bidi"))
OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
PROPAGATION_S = 15


def sid(service: str) -> str:
    return f"spiffe://{TD}/service/{service}"


POLICIES = f"""\
kind: AuthorizationPolicy
name: echo-exact            # exact source, exact method
spec:
  service: echo
  rules:
    - action: ALLOW
      sources: ["{sid('web')}"]
      methods: ["{UNARY}"]
---
kind: AuthorizationPolicy
name: echo-prefix           # prefix source (web, webhook), prefix method
spec:
  service: echo
  rules:
    - action: ALLOW
      sources: ["spiffe://{TD}/service/web*"]
      methods: ["/meshtest.Echo/Server*"]
---
kind: AuthorizationPolicy
name: echo-any-source       # any source, one method
spec:
  service: echo
  rules:
    - action: ALLOW
      sources: ["*"]
      methods: ["{CLIENT}"]
---
kind: AuthorizationPolicy
name: echo-ops              # one source, any method
spec:
  service: echo
  rules:
    - action: ALLOW
      sources: ["{sid('ops')}"]
      methods: ["*"]
---
kind: AuthorizationPolicy
name: echo-no-bidi          # DENY wins over every ALLOW above
spec:
  service: echo
  rules:
    - action: DENY
      sources: ["*"]
      methods: ["{BIDI}"]
"""

# caller -> method -> expected status, with the policies above
MATRIX = {
    "web": {UNARY: OK, SERVER: OK, CLIENT: OK, BIDI: DENIED},
    "webhook": {UNARY: DENIED, SERVER: OK, CLIENT: OK, BIDI: DENIED},
    "batch": {UNARY: DENIED, SERVER: DENIED, CLIENT: OK, BIDI: DENIED},
    "ops": {UNARY: OK, SERVER: OK, CLIENT: OK, BIDI: DENIED},
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("authz"))
    try:
        m.start("echo", "echo-1")
        m.start("store", "store-1")
        for caller in CALLERS:
            m.start(caller, f"{caller}-1", app=False)
        procs.wait_for(lambda: m.all_synced({"echo-1", "store-1",
                                             *(f"{c}-1" for c in CALLERS)}), 30,
                       what="every sidecar registered and SYNCED")
        yield m
    finally:
        m.close()


def call(mesh: Mesh, caller: str, method: str, service: str = "echo"
         ) -> tuple[grpc.StatusCode, str]:
    """One call of ``method`` from ``caller``'s sidecar to ``service``: (status, details)."""
    outbound = mesh.sidecars[f"{caller}-1"].ready["outbound"]
    req = echo_pb2.EchoRequest(payload=b"hi", count=2)
    with grpc.insecure_channel(outbound, options=[("grpc.default_authority", service)]) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        try:
            if method == UNARY:
                stub.Unary(req, timeout=5)
            elif method == SERVER:
                list(stub.ServerStream(req, timeout=5))
            elif method == CLIENT:
                stub.ClientStream(iter([req, req]), timeout=5)
            else:
                list(stub.Bidi(iter([req, req]), timeout=5))
        except grpc.RpcError as err:
            return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return OK, ""


def metrics(mesh: Mesh, instance: str) -> dict[tuple[str, str, str], float]:
    """``mesh_authz_decisions_total`` of a sidecar: (decision, policy, mode) -> count."""
    admin = mesh.sidecars[instance].ready["admin"]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "mesh_authz_decisions":
            for s in fam.samples:
                if s.name == "mesh_authz_decisions_total":
                    out[(s.labels["decision"], s.labels["policy"], s.labels["mode"])] = s.value
    return out


def apply_yaml(mesh: Mesh, tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    r = meshctl(mesh.cp, "apply", "-f", str(path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_without_policies_a_new_mesh_lets_every_caller_through(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "authz", "default")
    assert r.returncode == 0 and r.stdout.strip() == "allow", r.stdout + r.stderr
    for caller in CALLERS:
        assert call(mesh, caller, BIDI) == (OK, "")
    assert metrics(mesh, "echo-1")[("allow", "(default)", "enforce")] >= len(CALLERS)


def test_every_rule_kind_allows_and_denies_as_written(mesh: Mesh, tmp_path: Path) -> None:
    out = apply_yaml(mesh, tmp_path, "echo.yaml", POLICIES)
    assert out.count("created") == 5, out
    got = meshctl(mesh.cp, "get", "authorizationpolicies", "-o", "json")
    assert got.returncode == 0, got.stderr
    assert {d["name"] for d in json.loads(got.stdout)} == {
        "echo-exact", "echo-prefix", "echo-any-source", "echo-ops", "echo-no-bidi"}
    # one apply, one snapshot: once batch is refused, echo-1 holds every policy
    procs.wait_for(lambda: call(mesh, "batch", UNARY)[0] == DENIED, PROPAGATION_S,
                   what="the policies enforced by echo's sidecar")
    seen = {caller: {m: call(mesh, caller, m)[0] for m in row} for caller, row in MATRIX.items()}
    assert seen == MATRIX
    # the caller hears who it is and what refused it; the sidecar counted each decision
    code, details = call(mesh, "batch", UNARY)
    assert code == DENIED and sid("batch") in details and UNARY in details
    assert "echo-exact" in details and "echo-no-bidi" in details  # "no rule of ... allows it"
    code, details = call(mesh, "ops", BIDI)
    assert code == DENIED and sid("ops") in details and "policy echo-no-bidi" in details
    counts = metrics(mesh, "echo-1")
    assert counts[("deny", "echo-no-bidi", "enforce")] >= 5
    assert counts[("deny", "(no rule)", "enforce")] >= 4
    assert counts[("allow", "echo-ops", "enforce")] >= 2
    # the callers' own sidecars answer nothing themselves: the refusal came from echo's
    assert not metrics(mesh, "batch-1").get(("deny", "(no rule)", "enforce"))


def test_authz_check_answers_as_the_sidecar_decides_with_exit_codes(mesh: Mesh) -> None:
    ok = meshctl(mesh.cp, "authz", "check", sid("web"), "echo", UNARY)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == "allow" and "policy echo-exact rule 0" in ok.stdout
    denied = meshctl(mesh.cp, "authz", "check", "batch", "echo", UNARY)  # a bare name
    assert denied.returncode == 1 and denied.stdout.splitlines()[0] == "deny", denied.stderr
    assert sid("batch") in denied.stdout
    bidi = meshctl(mesh.cp, "authz", "check", sid("ops"), "echo", BIDI, "-o", "json")
    assert bidi.returncode == 1
    doc = json.loads(bidi.stdout)
    assert (doc["decision"], doc["policy"], doc["rule"]) == ("deny", "echo-no-bidi", 0)
    assert doc["dry_run"] is None
    for caller, row in MATRIX.items():  # the same answers as the data path
        for method, expected in row.items():
            r = meshctl(mesh.cp, "authz", "check", caller, "echo", method, "-o", "json")
            assert json.loads(r.stdout)["allowed"] == (expected == OK), (caller, method)
    bad = meshctl(mesh.cp, "authz", "check", sid("web"), "echo", "Unary")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "method" in bad.stderr and bad.stdout == ""


def test_deleting_the_deny_policy_lets_the_any_method_rule_through(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "delete", "authorizationpolicy", "echo-no-bidi")
    assert r.returncode == 0, r.stderr
    procs.wait_for(lambda: call(mesh, "ops", BIDI)[0] == OK, PROPAGATION_S,
                   what="ops may call Bidi once the DENY policy is gone")
    assert call(mesh, "web", BIDI)[0] == DENIED  # no ALLOW rule names web for Bidi
    # leaves: echo's policies without echo-no-bidi


def test_a_dry_run_policy_is_counted_but_never_enforced(mesh: Mesh, tmp_path: Path) -> None:
    apply_yaml(mesh, tmp_path, "trial.yaml", f"""\
kind: AuthorizationPolicy
name: store-trial
spec:
  service: store
  mode: dry_run
  rules:
    - action: ALLOW
      sources: ["{sid('web')}"]
""")

    def dry_counted() -> bool:
        assert call(mesh, "batch", UNARY, "store") == (OK, "")  # never enforced
        return metrics(mesh, "store-1").get(("deny", "(no rule)", "dry_run"), 0) >= 1
    procs.wait_for(dry_counted, PROPAGATION_S, interval_s=0.2,
                   what="store's sidecar counting the dry-run denial")
    assert call(mesh, "web", UNARY, "store") == (OK, "")
    procs.wait_for(lambda: metrics(mesh, "store-1").get(("allow", "store-trial", "dry_run")),
                   5, what="the dry-run allow counted")
    counts = metrics(mesh, "store-1")
    assert counts.get(("deny", "(default)", "enforce"), 0) == 0
    check = meshctl(mesh.cp, "authz", "check", "batch", "store", UNARY)
    assert check.returncode == 0 and check.stdout.startswith("allow"), check.stdout
    assert "dry run:" in check.stdout and "deny" in check.stdout.splitlines()[-1]
    log = mesh.sidecars["store-1"].log_text()
    assert "dry run of store's policies: deny" in log and sid("batch") in log
    # leaves: store-trial (dry run) on store


def test_default_deny_closes_services_without_allow_rules(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "authz", "default", "deny")
    assert r.returncode == 0 and "was allow" in r.stdout, r.stdout + r.stderr
    assert meshctl(mesh.cp, "authz", "default").stdout.strip() == "deny"
    procs.wait_for(lambda: call(mesh, "web", UNARY, "store")[0] == DENIED, PROPAGATION_S,
                   what="store closed by the default")
    code, details = call(mesh, "batch", UNARY, "store")
    assert code == DENIED and sid("batch") in details and "denies by default" in details
    assert call(mesh, "web", UNARY) == (OK, "")  # echo's ALLOW rules still admit web
    assert metrics(mesh, "store-1")[("deny", "(default)", "enforce")] >= 2
    again = meshctl(mesh.cp, "authz", "default", "DENY")
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert meshctl(mesh.cp, "authz", "check", "web", "store", UNARY).returncode == 1
    back = meshctl(mesh.cp, "authz", "default", "allow")
    assert back.returncode == 0, back.stderr
    procs.wait_for(lambda: call(mesh, "web", UNARY, "store")[0] == OK, PROPAGATION_S,
                   what="store open again")
    # leaves: the default allow


def test_the_default_survives_a_control_plane_restart(mesh: Mesh) -> None:
    assert meshctl(mesh.cp, "authz", "default", "deny").returncode == 0
    assert mesh.cp.proc.stop() == 0, mesh.cp.proc.log_tail()
    mesh._channel = None
    mesh.restart_cp()
    r = meshctl(mesh.cp, "authz", "default")
    assert r.returncode == 0 and r.stdout.strip() == "deny", r.stdout + r.stderr
    assert meshctl(mesh.cp, "authz", "default", "allow").returncode == 0
    # leaves: a restarted control plane, the default allow


def test_a_workload_identity_can_change_no_authorization(mesh: Mesh) -> None:
    wl = Workload()
    join(create_token(mesh.cp, "rogue"), wl, csr_service="rogue")
    doc = {"kind": "AuthorizationPolicy", "name": "open-all",
           "spec": {"service": "echo", "rules": [{"action": "ALLOW", "sources": ["*"]}]}}
    with mtls_channel(mesh.cp, wl) as ch:
        admin = pb_grpc.AdminStub(ch)
        attempts = [
            lambda: admin.ApplyConfig(pb.ApplyConfigRequest(documents=[pb.ConfigDocument(
                source="rogue", index=1, json=json.dumps(doc))]), timeout=5),
            lambda: admin.DeleteConfig(pb.DeleteConfigRequest(
                kind="AuthorizationPolicy", name="echo-exact"), timeout=5),
            lambda: admin.SetAuthzDefault(pb.SetAuthzDefaultRequest(action="allow"),
                                          timeout=5),
            lambda: admin.CheckAuthz(pb.CheckAuthzRequest(
                source=sid("rogue"), service="echo", method=UNARY), timeout=5),
        ]
        for attempt in attempts:
            with pytest.raises(grpc.RpcError) as info:
                attempt()
            assert info.value.code() == DENIED, info.value
            assert sid("rogue") in (info.value.details() or "")
    got = meshctl(mesh.cp, "get", "authorizationpolicy", "open-all")
    assert got.returncode != 0 and "NOT_FOUND" in got.stderr
