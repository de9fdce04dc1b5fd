"""The chart's RBAC grants exactly what the operator calls, and the checker that says so works."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from chartkit import NAMESPACE, RELEASE, render
from rbac import ApiCall, assert_rbac_exact, check_rbac, load_calls, main, request_to_call

DECLARED_CALLS = Path(__file__).with_name("operator_calls.json")
# Written by tests/operator.rs from the Kubernetes API emulator's request record (scripts/test
# runs the Rust tests first): the operator watching all namespaces
# (every_kubernetes_call_of_the_operator_is_recorded_for_the_rbac_check), and watching two
# (watched_namespaces_confine_every_call_of_the_operator).
RECORDED_CALLS = Path(__file__).resolve().parents[2] / "target" / "rbac" / "operator-calls.json"
RECORDED_CALLS_WATCHING_TWO = RECORDED_CALLS.with_name("operator-calls-watch-namespaces.json")
# Declared but rare enough that a test run may not make them: kube-runtime's Recorder patches an
# Event instead of creating it when the same Event repeats within its series window.
RARE_CALLS = {("patch", "events.k8s.io", "events", "")}
SERVICE_ACCOUNT = (NAMESPACE, f"{RELEASE}-mailpoll")
LEASE = f"{RELEASE}-mailpoll-leader"
# The namespace whose objects the declared calls touch when the operator watches all of them.
SAMPLE_NAMESPACE = "team-a"


def declared_calls(watch_namespaces: list[str]) -> list[ApiCall]:
    return load_calls(
        DECLARED_CALLS,
        {
            "watch_scope": list(watch_namespaces) or [None],
            "object_namespace": list(watch_namespaces) or [SAMPLE_NAMESPACE],
            "release_namespace": [NAMESPACE],
            "lease_name": [LEASE],
        },
    )


@pytest.mark.parametrize("watch_namespaces", [[], ["team-a"], ["team-a", "team-b", NAMESPACE]])
def test_the_rendered_rbac_grants_exactly_the_declared_calls(watch_namespaces: list[str]) -> None:
    rendered = render({"watchNamespaces": watch_namespaces})
    assert_rbac_exact(declared_calls(watch_namespaces), rendered.objects, SERVICE_ACCOUNT)


def substitutions(watch_namespaces: list[str]) -> dict[str, list[str | None]]:
    return {
        "watch_scope": list(watch_namespaces) or [None],
        "object_namespace": list(watch_namespaces) or [SAMPLE_NAMESPACE],
        "release_namespace": [NAMESPACE],
        "lease_name": [LEASE],
    }


def _kinds(calls: list[ApiCall]) -> set[tuple[str, str, str, str]]:
    return {(c.verb, c.api_group, c.resource, c.subresource) for c in calls}


def recorded_calls(path: Path, substitutions: dict[str, list[str | None]]) -> list[ApiCall]:
    assert path.exists(), (
        f"{path} is missing: run the Rust tests first (scripts/test does), "
        "tests/operator.rs writes it from the Kubernetes API emulator's request record"
    )
    return load_calls(path, substitutions)


def assert_granted_and_needed(recorded: list[ApiCall], watch_namespaces: list[str]) -> None:
    rendered = render({"watchNamespaces": watch_namespaces})
    # Every call the operator really made is granted...
    not_granted = [p for p in check_rbac(recorded, rendered.objects, SERVICE_ACCOUNT) if p.startswith("not granted")]
    assert not_granted == []
    # ...and the declared list (which the chart grants exactly) holds nothing it never makes.
    declared = declared_calls(watch_namespaces)
    assert _kinds(recorded) <= _kinds(declared), "the operator makes calls the declared list lacks"
    unused = _kinds(declared) - _kinds(recorded) - RARE_CALLS
    assert not unused, f"declared (and granted) but never made by the operator: {sorted(unused)}"


def test_the_chart_grants_every_call_the_operator_made_and_nothing_it_never_makes() -> None:
    assert_granted_and_needed(recorded_calls(RECORDED_CALLS, substitutions([])), [])


def test_the_chart_grants_every_call_the_operator_made_watching_listed_namespaces() -> None:
    # Observed with watchNamespaces set, not derived from the all-namespaces run: the operator's
    # watches, status writes, Secret reads and Events in each watched namespace, its Lease in
    # the release namespace.
    watch_namespaces = ["team-a", "team-b"]
    recorded = recorded_calls(
        RECORDED_CALLS_WATCHING_TWO,
        {
            "watched_namespace_1": ["team-a"],
            "watched_namespace_2": ["team-b"],
            "release_namespace": [NAMESPACE],
            "lease_name": [LEASE],
        },
    )
    cluster_wide = [call.describe() for call in recorded if call.namespace is None]
    assert cluster_wide == [], "watching listed namespaces, nothing is cluster-wide"
    assert_granted_and_needed(recorded, watch_namespaces)


def test_watching_all_namespaces_uses_a_cluster_role() -> None:
    rendered = render()
    assert [r["metadata"]["name"] for r in rendered.of_kind("ClusterRole")] == [f"{RELEASE}-mailpoll"]
    roles = rendered.of_kind("Role")
    # Only leader election is namespaced, and only in the release namespace.
    assert [(r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles] == [
        (NAMESPACE, f"{RELEASE}-mailpoll-leader-election")
    ]


def test_watching_listed_namespaces_grants_nothing_cluster_wide() -> None:
    rendered = render({"watchNamespaces": ["team-a", "team-b"]})
    assert not rendered.of_kind("ClusterRole") and not rendered.of_kind("ClusterRoleBinding")
    role_namespaces = sorted(r["metadata"]["namespace"] for r in rendered.of_kind("Role"))
    assert role_namespaces == sorted(["team-a", "team-b", NAMESPACE])
    # A call outside the listed namespaces is refused.
    stray = ApiCall("get", "", "secrets", namespace="team-c")
    problems = check_rbac(declared_calls(["team-a", "team-b"]) + [stray], rendered.objects, SERVICE_ACCOUNT)
    assert problems == [f"not granted: {stray.describe()}"]


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    rendered = render({"rbac": {"create": False}})
    kinds = {obj["kind"] for obj in rendered.objects}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    rendered = render({"serviceAccount": {"create": False, "name": "existing"}})
    assert not rendered.of_kind("ServiceAccount")
    assert_rbac_exact(declared_calls([]), rendered.objects, (NAMESPACE, "existing"))


def test_the_lease_rules_are_limited_to_the_operators_lease() -> None:
    rendered = render()
    calls = declared_calls([])
    other_lease = ApiCall("update", "coordination.k8s.io", "leases", namespace=NAMESPACE, name="someone-elses")
    assert check_rbac(calls + [other_lease], rendered.objects, SERVICE_ACCOUNT) == [
        f"not granted: {other_lease.describe()}"
    ]
    elsewhere = ApiCall("create", "coordination.k8s.io", "leases", namespace="kube-system")
    assert check_rbac(calls + [elsewhere], rendered.objects, SERVICE_ACCOUNT) == [f"not granted: {elsewhere.describe()}"]


# --- the checker itself ----------------------------------------------------------------------------


def test_the_checker_reports_a_call_that_is_not_granted() -> None:
    rendered = render()
    deleting = ApiCall("delete", "mailpoll.dev", "mailboxpolls", namespace="team-a", name="x")
    problems = check_rbac(declared_calls([]) + [deleting], rendered.objects, SERVICE_ACCOUNT)
    assert problems == ["not granted: delete mailpoll.dev/mailboxpolls x in namespace team-a"]
    with pytest.raises(AssertionError, match="not granted"):
        assert_rbac_exact(declared_calls([]) + [deleting], rendered.objects, SERVICE_ACCOUNT)


def test_the_checker_reports_a_grant_that_is_never_called() -> None:
    rendered = render()
    calls = [c for c in declared_calls([]) if not (c.resource == "events" and c.verb == "patch")]
    problems = check_rbac(calls, rendered.objects, SERVICE_ACCOUNT)
    assert len(problems) == 1
    assert problems[0].startswith("granted but never called: patch events.k8s.io/events in all namespaces")


def test_the_checker_rejects_wildcards_and_dangling_bindings() -> None:
    objects = copy.deepcopy(render().objects)
    role = next(obj for obj in objects if obj["kind"] == "ClusterRole")
    role["rules"].append({"apiGroups": [""], "resources": ["*"], "verbs": ["get"]})
    problems = check_rbac(declared_calls([]), objects, SERVICE_ACCOUNT)
    assert any("wildcard" in problem for problem in problems), problems
    objects = [obj for obj in objects if obj["kind"] != "ClusterRole"]
    problems = check_rbac(declared_calls([]), objects, SERVICE_ACCOUNT)
    assert any("is not in the rendered chart" in problem for problem in problems), problems
    assert any(problem.startswith("not granted: watch mailpoll.dev/mailboxpolls") for problem in problems)


def test_the_checker_counts_only_bindings_of_this_service_account() -> None:
    objects = copy.deepcopy(render().objects)
    for binding in objects:
        if binding["kind"] == "ClusterRoleBinding":
            binding["subjects"][0]["namespace"] = "elsewhere"
    problems = check_rbac(declared_calls([]), objects, SERVICE_ACCOUNT)
    assert any(problem.startswith("not granted: list mailpoll.dev/mailboxpolls") for problem in problems)


def test_a_cluster_role_bound_in_one_namespace_grants_only_there() -> None:
    objects = [
        {"kind": "ClusterRole", "metadata": {"name": "reader"},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
        {"kind": "RoleBinding", "metadata": {"name": "reader", "namespace": "a"},
         "roleRef": {"kind": "ClusterRole", "name": "reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]},
    ]
    inside = ApiCall("get", "", "secrets", namespace="a", name="s")
    outside = ApiCall("get", "", "secrets", namespace="b", name="s")
    assert check_rbac([inside], objects, ("ops", "op")) == []
    assert check_rbac([inside, outside], objects, ("ops", "op")) == [f"not granted: {outside.describe()}"]


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/apis/mailpoll.dev/v1alpha1/mailboxpolls", "", ApiCall("list", "mailpoll.dev", "mailboxpolls")),
        ("GET", "/apis/mailpoll.dev/v1alpha1/mailboxpolls", "watch=true&resourceVersion=5",
         ApiCall("watch", "mailpoll.dev", "mailboxpolls")),
        ("GET", "/apis/mailpoll.dev/v1alpha1/namespaces/a/mailboxpolls?watch=1", "",
         ApiCall("watch", "mailpoll.dev", "mailboxpolls", namespace="a")),
        ("GET", "/apis/mailpoll.dev/v1alpha1/namespaces/a/mailboxpolls/x", "",
         ApiCall("get", "mailpoll.dev", "mailboxpolls", namespace="a", name="x")),
        ("PATCH", "/apis/mailpoll.dev/v1alpha1/namespaces/a/mailboxpolls/x/status", "fieldManager=mailpoll",
         ApiCall("patch", "mailpoll.dev", "mailboxpolls", "status", "a", "x")),
        ("GET", "/api/v1/namespaces/a/secrets/creds", "", ApiCall("get", "", "secrets", namespace="a", name="creds")),
        ("POST", "/apis/events.k8s.io/v1/namespaces/a/events", "", ApiCall("create", "events.k8s.io", "events", namespace="a")),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/ops/leases/l", "",
         ApiCall("update", "coordination.k8s.io", "leases", namespace="ops", name="l")),
        ("DELETE", "/api/v1/namespaces/a/pods", "", ApiCall("deletecollection", "", "pods", namespace="a")),
        ("GET", "/api/v1/namespaces/a", "", ApiCall("get", "", "namespaces", name="a")),
    ],
)
def test_recorded_requests_map_to_authorizer_calls(method: str, path: str, query: str, expected: ApiCall) -> None:
    assert request_to_call(method, path, query) == expected


def test_requests_that_are_not_resource_requests_are_refused() -> None:
    for path in ("/healthz", "/apis", "/api/v1", "/apis/mailpoll.dev/v1alpha1"):
        with pytest.raises(ValueError):
            request_to_call("GET", path)


def test_a_recorded_request_file_feeds_the_check(tmp_path: Path) -> None:
    rendered = render({"watchNamespaces": ["team-a"]})
    record = [
        {"method": "GET", "path": "/apis/mailpoll.dev/v1alpha1/namespaces/team-a/mailboxpolls", "query": ""},
        {"method": "GET", "path": "/apis/mailpoll.dev/v1alpha1/namespaces/team-a/mailboxpolls", "query": "watch=true"},
        {"method": "PATCH", "path": "/apis/mailpoll.dev/v1alpha1/namespaces/team-a/mailboxpolls/box/status"},
        {"method": "GET", "path": "/api/v1/namespaces/team-a/secrets/graph-credentials"},
        {"method": "POST", "path": "/apis/events.k8s.io/v1/namespaces/team-a/events"},
        {"method": "PATCH", "path": "/apis/events.k8s.io/v1/namespaces/team-a/events/box.1"},
        {"method": "GET", "path": f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{LEASE}"},
        {"method": "POST", "path": f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"},
        {"method": "PUT", "path": f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{LEASE}"},
    ]
    calls_file = tmp_path / "calls.json"
    calls_file.write_text(json.dumps(record), encoding="utf-8")
    assert_rbac_exact(load_calls(calls_file), rendered.objects, SERVICE_ACCOUNT)

    # The command-line form, as a CI step would run it on a recorded scenario.
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text("\n---\n".join(rendered.raw[t] for t in sorted(rendered.raw) if not t.endswith("NOTES.txt")),
                         encoding="utf-8")
    args = [str(calls_file), "--rendered", str(manifests), "--service-account", "/".join(SERVICE_ACCOUNT)]
    assert main(args) == 0
    calls_file.write_text(json.dumps(record[:-1]), encoding="utf-8")
    assert main(args) == 1


def test_unknown_keys_and_unresolved_placeholders_in_a_calls_file_are_errors(tmp_path: Path) -> None:
    calls_file = tmp_path / "calls.json"
    calls_file.write_text(json.dumps([{"verb": "get", "resource": "secrets", "namespaec": "a"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown keys"):
        load_calls(calls_file)
    with pytest.raises(KeyError, match="watch_scope"):
        load_calls(DECLARED_CALLS, {})


# --- Secrets per namespace ---------------------------------------------------------------------------


def documented_secret_binding(namespace: str) -> dict:
    """The RoleBinding README tells a namespace's owners to create."""
    return {
        "kind": "RoleBinding",
        "metadata": {"name": "mailpoll-secret-reader", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{RELEASE}-mailpoll-secret-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT[1], "namespace": SERVICE_ACCOUNT[0]}],
    }


def secret_reads(namespace: str) -> ApiCall:
    return ApiCall("get", "", "secrets", namespace=namespace, name="graph-credentials")


@pytest.mark.parametrize("watch_namespaces", [[], ["team-a", "team-b"]])
def test_per_namespace_secret_access_grants_secrets_only_where_bound(watch_namespaces: list[str]) -> None:
    rendered = render({"watchNamespaces": watch_namespaces, "rbac": {"secretAccess": "perNamespace"}})
    reader = rendered.one("ClusterRole", f"{RELEASE}-mailpoll-secret-reader")
    assert reader["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    for role in rendered.of_kind("ClusterRole") + rendered.of_kind("Role"):
        if role is reader:
            continue
        granted = {resource for rule in role["rules"] for resource in rule["resources"]}
        assert "secrets" not in granted, f"{role['metadata']['name']} still grants Secrets"
    # Everything but Secrets is granted as before.
    others = [c for c in declared_calls(watch_namespaces) if c.resource != "secrets"]
    assert [p for p in check_rbac(others, rendered.objects, SERVICE_ACCOUNT) if p.startswith("not granted")] == []
    # No Secret anywhere until a namespace's owners bind the reader, then only there.
    assert check_rbac([secret_reads("team-a")], rendered.objects, SERVICE_ACCOUNT)[0].startswith("not granted")
    bound = rendered.objects + [documented_secret_binding("team-a")]
    assert not [p for p in check_rbac([secret_reads("team-a")], bound, SERVICE_ACCOUNT) if p.startswith("not granted")]
    assert check_rbac([secret_reads("team-b")], bound, SERVICE_ACCOUNT)[0].startswith("not granted")


def test_the_chart_can_bind_the_secret_reader_in_listed_namespaces() -> None:
    rendered = render({"rbac": {"secretAccess": "perNamespace", "secretNamespaces": ["team-a"]}})
    bindings = [b for b in rendered.of_kind("RoleBinding") if b["roleRef"]["name"].endswith("secret-reader")]
    assert [(b["metadata"]["namespace"], b["roleRef"]["kind"]) for b in bindings] == [("team-a", "ClusterRole")]
    problems = check_rbac([secret_reads("team-a"), secret_reads("team-b")], rendered.objects, SERVICE_ACCOUNT)
    assert [p for p in problems if p.startswith("not granted")] == [f"not granted: {secret_reads('team-b').describe()}"]


def test_the_documented_binding_matches_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "kubectl create rolebinding mailpoll-secret-reader" in readme
    assert "--clusterrole=<release>-mailpoll-secret-reader" in readme
    assert "secretAccess: perNamespace" in readme
