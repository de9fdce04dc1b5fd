"""The Helm chart, linted and rendered by the real Helm engine, and its output checked."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from chartkit import (
    CHART_CRD_COPY,
    CHART_DIR,
    CRD_FILE,
    NAMESPACE,
    RELEASE,
    STANDARD_LABELS,
    WORKLOAD_KINDS,
    container_env,
    load_chart,
    pod_spec,
    render,
    value_references,
)

# Value sets every render check runs against.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "bundled-postgres": {"postgresql": {"enabled": True}},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "three-replicas": {"replicaCount": 3},
    "database-url": {"database": {"existingSecret": "pg-url", "urlKey": "url", "sslmode": "verify-full"}},
    "national-cloud": {"cloud": {"name": "usGov"}},
    "alerts-and-dashboard": {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "secrets-per-namespace": {"rbac": {"secretAccess": "perNamespace", "secretNamespaces": ["team-a"]}},
    "network-policy": {
        "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}, "database": {"cidrs": ["10.1.0.0/16"]}}
    },
    "workload-identity-webhook": {"workloadIdentity": {"enabled": True, "clientId": "app-id", "tenantId": "tenant-id"}},
    "workload-identity-projected": {
        "workloadIdentity": {"enabled": True, "useWebhook": False, "clientId": "app-id", "tenantId": "tenant-id"}
    },
    "everything-set": {
        "replicaCount": 3,
        "image": {"repository": "registry.example.com/mailpoll", "digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "registry"}],
        "fullnameOverride": "mailpoll",
        "watchNamespaces": ["support"],
        "operator": {
            "workerConcurrency": 32,
            "shutdownGraceSeconds": 120,
            "leaderElection": {"leaseName": "mailpoll-leader"},
            "logFormat": "text",
            "httpPort": 9090,
            "extraEnv": [{"name": "MAILPOLL_EXTRA", "value": "1"}],
        },
        "serviceAccount": {"name": "mailpoll-operator", "annotations": {"example.com/role": "x"}},
        "podAntiAffinity": "hard",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "ops"},
        "service": {"port": 9100, "annotations": {"example.com/s": "t"}},
        "serviceMonitor": {"enabled": True},
        "podDisruptionBudget": {"maxUnavailable": "50%"},
    },
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest):
    return render(VALUE_SETS[request.param])


def lint_problems(report: dict[str, Any]) -> list[str]:
    # Severity 1 is informational (e.g. "icon is recommended"); 2 and up are warnings and errors.
    return report["errors"] + [
        f"{message['path']}: {message['error']}" for message in report["messages"] if message["severity"] >= 2
    ]


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_lint_passes_strictly(values_name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[values_name], strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert lint_problems(report) == []


def test_lint_passes_on_the_oldest_supported_kubernetes() -> None:
    report = helm.lint(CHART_DIR, strict=True, kube_version="v1.29.0")
    assert lint_problems(report) == []


def test_every_object_carries_the_standard_labels(rendered) -> None:
    assert rendered.objects, "the chart rendered nothing"
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels") or {}
        missing = [label for label in STANDARD_LABELS if not labels.get(label)]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks labels {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


# Every kind the chart may render, at the API version current clusters serve (none deprecated).
API_VERSIONS = {
    "CustomResourceDefinition": "apiextensions.k8s.io/v1",
    "ServiceAccount": "v1",
    "Secret": "v1",
    "Service": "v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ConfigMap": "v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "ValidatingWebhookConfiguration": "admissionregistration.k8s.io/v1",
    "Certificate": "cert-manager.io/v1",
    "Issuer": "cert-manager.io/v1",
}


def test_every_object_is_named_and_namespaced_where_it_should_be(rendered) -> None:
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"}
    for obj in rendered.objects:
        assert API_VERSIONS.get(obj["kind"]) == obj["apiVersion"], f"unexpected {obj['apiVersion']} {obj['kind']}"
        assert obj.get("apiVersion") and obj.get("kind"), obj
        assert obj["metadata"].get("name"), f"{obj['kind']} without a name"
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], f"{obj['kind']} is cluster-scoped"
        else:
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']} has no namespace"
    identities = [(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in rendered.objects]
    assert len(identities) == len(set(identities)), "two objects share a kind, namespace and name"


def test_no_value_renders_empty_or_missing(rendered) -> None:
    for template, text in rendered.raw.items():
        assert "<no value>" not in text, template
        assert "%!" not in text, f"{template} has a printf formatting error"

    def walk(node: Any, path: str, parent: Any = None) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{path}.{key}", node)
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}[{index}]", node)
        elif node == "" or node is None:
            # An empty field means a template read a value that is not there. Two are
            # legitimate: the core API group, and "watch all namespaces".
            core_group = ".apiGroups[" in path
            watch_all = isinstance(parent, dict) and parent.get("name") == "MAILPOLL_WATCH_NAMESPACES"
            assert core_group or watch_all, f"empty field {path}"

    for obj in rendered.objects:
        walk(obj, f"{obj['kind']}/{obj['metadata']['name']}")
    for workload in [o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS]:
        for container in pod_spec(workload)["containers"]:
            assert not container["image"].endswith(":"), container["image"]
            for name, variable in container_env(container).items():
                if "value" in variable and variable["value"] == "":
                    assert name == "MAILPOLL_WATCH_NAMESPACES", f"env {name} is empty"
                ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref.get("name") and ref.get("key"), f"env {name} has an incomplete secretKeyRef"


def test_every_workload_has_resources_probes_and_a_locked_down_security_context(rendered) -> None:
    workloads = [obj for obj in rendered.objects if obj["kind"] in WORKLOAD_KINDS]
    assert workloads, "no workload rendered"
    for workload in workloads:
        where = f"{workload['kind']} {workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext") or {}
        assert pod_security.get("runAsNonRoot") is True, where
        assert (pod_security.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        for container in spec["containers"] + (spec.get("initContainers") or []):
            at = f"{where} container {container['name']}"
            resources = container.get("resources") or {}
            assert (resources.get("requests") or {}).get("cpu"), f"{at}: no CPU request"
            assert (resources.get("requests") or {}).get("memory"), f"{at}: no memory request"
            assert (resources.get("limits") or {}).get("memory"), f"{at}: no memory limit"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert container.get(probe), f"{at}: no {probe}"
            security = container.get("securityContext") or {}
            assert security.get("runAsNonRoot") is True, at
            assert security.get("readOnlyRootFilesystem") is True, at
            assert security.get("allowPrivilegeEscalation") is False, at
            assert security.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not security.get("capabilities", {}).get("add"), at
            assert (security.get("seccompProfile") or {}).get("type") == "RuntimeDefault", at
            assert not security.get("privileged"), at
            # Probes on named ports must name a port the container declares.
            declared = {port["name"] for port in container.get("ports") or []}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                for handler in ("httpGet", "tcpSocket"):
                    port = (container[probe].get(handler) or {}).get("port")
                    if isinstance(port, str):
                        assert port in declared, f"{at}: {probe} uses undeclared port {port}"


def test_selectors_match_the_pods_they_select(rendered) -> None:
    pods = {
        obj["metadata"]["name"]: obj["spec"]["template"]["metadata"]["labels"]
        for obj in rendered.objects
        if obj["kind"] in ("Deployment", "StatefulSet")
    }

    def selects(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pods.items() if all(labels.get(k) == v for k, v in selector.items())]

    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert selects(obj["spec"]["selector"]["matchLabels"]) == [obj["metadata"]["name"]]
        if obj["kind"] == "Service":
            assert len(selects(obj["spec"]["selector"])) == 1, obj["metadata"]["name"]
        if obj["kind"] == "PodDisruptionBudget":
            assert selects(obj["spec"]["selector"]["matchLabels"]) == [rendered.one("Deployment")["metadata"]["name"]]


# --- values: references and schema ---------------------------------------------------------------


def test_templates_reference_only_values_that_exist() -> None:
    with load_chart() as chart:
        defaults = chart.values
    missing = []
    for path, templates in sorted(value_references().items()):
        node: Any = defaults
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(f".Values.{path} (in {', '.join(sorted(templates))})")
                break
            node = node[key]
    assert not missing, "templates read values that values.yaml does not define:\n" + "\n".join(missing)
    assert len(value_references()) > 40, "the reference scan found too little; is the pattern broken?"


def schema_node_for(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    """The schema node describing a values path; None when the schema does not cover it."""
    node = schema
    for key in path:
        if key in (node.get("properties") or {}):
            node = node["properties"][key]
        elif node.get("additionalProperties") not in (None, False):
            # A free-form Kubernetes object (securityContext, affinity, ...): its keys are
            # Kubernetes', not the chart's.
            return node
        else:
            return None
    return node


def value_paths(values: dict[str, Any], prefix: list[str] | None = None) -> list[list[str]]:
    paths = []
    for key, value in values.items():
        path = (prefix or []) + [key]
        paths.append(path)
        if isinstance(value, dict):
            paths.extend(value_paths(value, path))
    return paths


def test_schema_covers_every_value_and_nothing_else() -> None:
    with load_chart() as chart:
        defaults, schema = chart.values, chart.schema
    assert schema is not None
    uncovered = [".".join(path) for path in value_paths(defaults) if schema_node_for(schema, path) is None]
    assert not uncovered, f"values without a schema: {uncovered}"

    def described(node: dict[str, Any], path: list[str]) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{'.'.join(path) or 'root'} accepts unknown keys"
        for key, child in (node.get("properties") or {}).items():
            child_path = path + [key]
            assert child.get("description"), f"{'.'.join(child_path)} has no description"
            # Every schema key is a real value (Helm's own `global` aside).
            if child_path != ["global"]:
                value: Any = defaults
                for part in child_path:
                    assert isinstance(value, dict) and part in value, f"schema key {'.'.join(child_path)} is not in values.yaml"
                    value = value[part]
            described(child, child_path)

    described(schema, [])


def test_the_defaults_satisfy_the_schema() -> None:
    with load_chart() as chart:
        chart.validate_schema(chart.values)


INVALID_VALUES = {
    "replicas-as-words": {"replicaCount": "two"},
    "negative-replicas": {"replicaCount": -1},
    "unknown-top-level-key": {"replicas": 2},
    "unknown-nested-key": {"operator": {"logLevel": "debug"}},
    "negative-service-port": {"service": {"port": -1}},
    "negative-http-port": {"operator": {"httpPort": -8080}},
    "port-out-of-range": {"service": {"port": 70000}},
    "unknown-log-format": {"operator": {"logFormat": "xml"}},
    "unknown-sslmode": {"database": {"sslmode": "on"}},
    "zero-workers": {"operator": {"workerConcurrency": 0}},
    "namespace-not-a-dns-label": {"watchNamespaces": ["Team_A"]},
    "watch-namespaces-not-a-list": {"watchNamespaces": "team-a"},
    "bad-anti-affinity": {"podAntiAffinity": "sometimes"},
    "bad-digest": {"image": {"digest": "latest"}},
    "crds-install-as-string": {"crds": {"install": "yes"}},
    "negative-content-retention": {"retention": {"contentDays": -1}},
    "identity-retention-under-a-day": {"retention": {"identityDays": 0.5}},
    "retention-interval-as-string": {"retention": {"intervalSeconds": "5m"}},
    "unknown-retention-value": {"retention": {"messagesDays": 3}},
    "egress-flag-as-string": {"webhookEgress": {"allowLoopback": "yes"}},
    "egress-host-with-a-scheme": {"webhookEgress": {"allowedHosts": ["https://hooks.example.com"]}},
    "egress-host-wildcard-inside": {"webhookEgress": {"allowedHosts": ["hooks.*.example.com"]}},
    "egress-cidr-not-an-address": {"webhookEgress": {"deniedCidrs": ["pods"]}},
    "egress-unknown-key": {"webhookEgress": {"allowPrivate": True}},
}


@pytest.mark.parametrize("case", sorted(INVALID_VALUES))
def test_the_schema_rejects_invalid_values(case: str) -> None:
    values = INVALID_VALUES[case]
    with load_chart() as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(values))
    # The same values stop a render (and so an install) too.
    with pytest.raises(helm.HelmValuesError):
        render(values)


# --- the CRD ------------------------------------------------------------------------------------


def test_the_chart_copy_of_the_crd_is_the_generated_file() -> None:
    assert CHART_CRD_COPY.read_bytes() == CRD_FILE.read_bytes(), (
        f"{CHART_CRD_COPY.relative_to(CHART_DIR.parents[1])} differs from crds/mailboxpoll.yaml; "
        "copy it again after regenerating the CRD: cp crds/mailboxpoll.yaml charts/mailpoll/files/mailboxpoll-crd.yaml"
    )


def test_the_rendered_crd_is_the_generated_crd_plus_helm_metadata() -> None:
    expected = [doc for doc in yaml.safe_load_all(CRD_FILE.read_text(encoding="utf-8")) if doc]
    assert len(expected) == 1 and expected[0]["kind"] == "CustomResourceDefinition"
    crd = render().one("CustomResourceDefinition")
    metadata = crd["metadata"]
    assert metadata["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert set(metadata["labels"]) == set(STANDARD_LABELS)
    # Only the Helm metadata is added; every other byte of meaning is the generated CRD's.
    stripped = json.loads(json.dumps(crd))
    del stripped["metadata"]["annotations"]
    del stripped["metadata"]["labels"]
    assert stripped == expected[0]


def test_the_crd_can_be_left_out_or_not_kept() -> None:
    assert not render({"crds": {"install": False}}).of_kind("CustomResourceDefinition")
    crd = render({"crds": {"keep": False}}).one("CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_no_crd_goes_through_helms_crds_folder() -> None:
    # Helm installs crds/ once and never upgrades it; the template is the only way in.
    with load_chart() as chart:
        assert chart.crds == []


# --- the operator Deployment -----------------------------------------------------------------------


def operator_container(values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = render(values).one("Deployment")
    containers = pod_spec(deployment)["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return deployment, containers[0]


def test_the_deployment_runs_two_spread_replicas_by_default() -> None:
    deployment, _ = operator_container()
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    preferred = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert preferred[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    spread = spec["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread[0]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert render({"replicaCount": 3}).one("Deployment")["spec"]["replicas"] == 3


def test_scheduling_values_reach_the_pod() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}}
    values = {
        "affinity": affinity,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "priorityClassName": "high",
        "topologySpread": {"enabled": False},
    }
    spec = pod_spec(render(values).one("Deployment"))
    assert spec["affinity"] == affinity
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert spec["priorityClassName"] == "high"
    assert "topologySpreadConstraints" not in spec
    hard = pod_spec(render({"podAntiAffinity": "hard"}).one("Deployment"))["affinity"]["podAntiAffinity"]
    assert list(hard) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    assert "affinity" not in pod_spec(render({"podAntiAffinity": "none"}).one("Deployment"))


def test_the_grace_period_covers_the_drain_deadline() -> None:
    for grace in (30, 300):
        deployment, container = operator_container({"operator": {"shutdownGraceSeconds": grace}})
        env = container_env(container)
        assert env["MAILPOLL_SHUTDOWN_GRACE_SECONDS"]["value"] == str(grace)
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] == grace + 10


def test_the_operator_gets_the_environment_it_reads() -> None:
    _, container = operator_container({"watchNamespaces": ["team-a", "team-b"]})
    env = container_env(container)
    assert container["args"] == ["operator"]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["MAILPOLL_LEASE_NAMESPACE"]["value"] == NAMESPACE
    assert env["MAILPOLL_LEASE_NAME"]["value"] == f"{RELEASE}-mailpoll-leader"
    assert env["MAILPOLL_WATCH_NAMESPACES"]["value"] == "team-a,team-b"
    assert env["MAILPOLL_WORKER_CONCURRENCY"]["value"] == "8"
    assert env["MAILPOLL_HTTP_ADDR"]["value"] == "0.0.0.0:8080"
    assert env["MAILPOLL_LOG_FORMAT"]["value"] == "json"
    assert env["MAILPOLL_LOG"]["value"] == "info"
    assert container["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "admission", "containerPort": 9443, "protocol": "TCP"},
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    _, container = operator_container({"operator": {"httpPort": 9090, "extraEnv": [{"name": "X", "value": "y"}]}})
    env = container_env(container)
    assert env["MAILPOLL_HTTP_ADDR"]["value"] == "0.0.0.0:9090"
    assert container["ports"][0]["containerPort"] == 9090
    assert env["X"] == {"name": "X", "value": "y"}


def test_the_webhook_egress_policy_reaches_the_operator() -> None:
    _, container = operator_container()
    env = container_env(container)
    # Shared-cluster defaults: nothing special allowed, no lists.
    assert env["MAILPOLL_WEBHOOK_ALLOW_LOOPBACK"]["value"] == "false"
    assert env["MAILPOLL_WEBHOOK_ALLOW_LINK_LOCAL"]["value"] == "false"
    assert env["MAILPOLL_WEBHOOK_ALLOW_OTHER_NAMESPACES"]["value"] == "false"
    assert env["MAILPOLL_CLUSTER_DOMAIN"]["value"] == "cluster.local"
    for name in ["MAILPOLL_WEBHOOK_ALLOWED_HOSTS", "MAILPOLL_WEBHOOK_ALLOWED_CIDRS", "MAILPOLL_WEBHOOK_DENIED_CIDRS"]:
        assert name not in env, name

    _, container = operator_container(
        {
            "webhookEgress": {
                "allowLoopback": True,
                "allowedHosts": ["hooks.example.com", "*.shared.svc.cluster.local"],
                "allowedCidrs": ["10.0.5.0/24", "fd00:5::/64"],
                "deniedCidrs": ["10.244.0.0/16", "10.96.0.0/12"],
                "clusterDomain": "corp.internal",
            }
        }
    )
    env = container_env(container)
    assert env["MAILPOLL_WEBHOOK_ALLOW_LOOPBACK"]["value"] == "true"
    assert env["MAILPOLL_WEBHOOK_ALLOW_LINK_LOCAL"]["value"] == "false"
    assert env["MAILPOLL_WEBHOOK_ALLOWED_HOSTS"]["value"] == "hooks.example.com,*.shared.svc.cluster.local"
    assert env["MAILPOLL_WEBHOOK_ALLOWED_CIDRS"]["value"] == "10.0.5.0/24,fd00:5::/64"
    assert env["MAILPOLL_WEBHOOK_DENIED_CIDRS"]["value"] == "10.244.0.0/16,10.96.0.0/12"
    assert env["MAILPOLL_CLUSTER_DOMAIN"]["value"] == "corp.internal"


def test_the_pool_follows_the_worker_concurrency_unless_set() -> None:
    _, container = operator_container({"operator": {"workerConcurrency": 32}})
    # Unset, the binary sizes the pool at workerConcurrency + 4: raising one raises the other.
    assert "MAILPOLL_DB_MAX_CONNECTIONS" not in container_env(container)
    _, container = operator_container({"database": {"maxConnections": 40}})
    assert container_env(container)["MAILPOLL_DB_MAX_CONNECTIONS"]["value"] == "40"


def test_extra_volumes_reach_the_pod() -> None:
    volume = {"name": "db-ca", "secret": {"secretName": "db-ca"}}
    mount = {"name": "db-ca", "mountPath": "/etc/mailpoll/db-ca", "readOnly": True}
    deployment, container = operator_container({"extraVolumes": [volume], "extraVolumeMounts": [mount]})
    assert volume in pod_spec(deployment)["volumes"]
    assert mount in container["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], "the scratch space stays"


def test_lease_timing_reaches_the_operator_and_is_checked() -> None:
    _, container = operator_container()
    env = container_env(container)
    assert (
        env["MAILPOLL_LEASE_DURATION_SECONDS"]["value"],
        env["MAILPOLL_LEASE_RENEW_DEADLINE_SECONDS"]["value"],
        env["MAILPOLL_LEASE_RETRY_PERIOD_SECONDS"]["value"],
    ) == ("15", "10", "2")
    timing = {"leaseDurationSeconds": 30, "renewDeadlineSeconds": 20, "retryPeriodSeconds": 4}
    _, container = operator_container({"operator": {"leaderElection": timing}})
    assert container_env(container)["MAILPOLL_LEASE_DURATION_SECONDS"]["value"] == "30"
    with pytest.raises(Exception, match="retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"):
        render({"operator": {"leaderElection": {"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}}})


def test_retention_periods_reach_the_operator_with_documented_defaults() -> None:
    _, container = operator_container({})
    env = container_env(container)
    assert env["MAILPOLL_CONTENT_RETENTION_DAYS"]["value"] == "30"
    assert env["MAILPOLL_IDENTITY_RETENTION_DAYS"]["value"] == "180"
    assert env["MAILPOLL_POLL_HISTORY_RETENTION_DAYS"]["value"] == "30"
    assert env["MAILPOLL_FINISHED_TASK_RETENTION_DAYS"]["value"] == "7"
    assert env["MAILPOLL_DEAD_TASK_RETENTION_DAYS"]["value"] == "30"
    assert env["MAILPOLL_RETENTION_INTERVAL_SECONDS"]["value"] == "300"

    _, container = operator_container({"retention": {"contentDays": 7, "identityDays": 365, "deadTaskDays": 90}})
    env = container_env(container)
    assert env["MAILPOLL_CONTENT_RETENTION_DAYS"]["value"] == "7"
    assert env["MAILPOLL_IDENTITY_RETENTION_DAYS"]["value"] == "365"
    assert env["MAILPOLL_DEAD_TASK_RETENTION_DAYS"]["value"] == "90"


def test_the_image_follows_the_values() -> None:
    _, container = operator_container()
    assert container["image"] == "ghcr.io/mailpoll/mailpoll:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    _, container = operator_container({"image": {"tag": "0.2.0", "pullPolicy": "Always"}})
    assert container["image"] == "ghcr.io/mailpoll/mailpoll:0.2.0"
    assert container["imagePullPolicy"] == "Always"
    digest = "sha256:" + "0" * 64
    _, container = operator_container({"image": {"tag": "0.2.0", "digest": digest}})
    assert container["image"] == f"ghcr.io/mailpoll/mailpoll@{digest}"


def secret_refs(env: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {
        name: (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
        for name, var in env.items()
        if "secretKeyRef" in (var.get("valueFrom") or {})
    }


def test_postgres_from_the_parts_in_an_existing_secret() -> None:
    _, container = operator_container({"database": {"existingSecret": "db", "keys": {"password": "pw"}}})
    env = container_env(container)
    assert secret_refs(env) == {
        "PGHOST": ("db", "host"),
        "PGPORT": ("db", "port"),
        "PGUSER": ("db", "user"),
        "PGPASSWORD": ("db", "pw"),
        "PGDATABASE": ("db", "database"),
    }
    # An empty URL: the driver takes every part from the PG* variables, unescaped.
    assert env["DATABASE_URL"]["value"] == "postgres://"
    assert env["PGSSLMODE"]["value"] == "require"


def test_postgres_from_a_url_in_an_existing_secret() -> None:
    _, container = operator_container({"database": {"existingSecret": "db", "urlKey": "url", "sslmode": "verify-full"}})
    env = container_env(container)
    assert secret_refs(env) == {"DATABASE_URL": ("db", "url")}
    assert env["PGSSLMODE"]["value"] == "verify-full"
    assert not {"PGHOST", "PGUSER", "PGPASSWORD"} & set(env)


def test_a_missing_database_secret_name_fails_the_render_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmRenderError, match="database.existingSecret is required"):
        render({"database": {"existingSecret": ""}})


def test_the_bundled_postgres_is_off_by_default_and_marked_not_for_production() -> None:
    assert not render().of_kind("StatefulSet")
    result = render({"postgresql": {"enabled": True}})
    statefulset = result.one("StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    assert "not-for-production" in json.dumps(statefulset["metadata"]["annotations"])
    assert "NOT FOR" in result.notes
    secret = result.one("Secret", f"{RELEASE}-mailpoll-postgresql")
    assert set(secret["stringData"]) == {"host", "port", "user", "password", "database"}
    assert len(secret["stringData"]["password"]) == 32
    assert secret["stringData"]["host"] == f"{RELEASE}-mailpoll-postgresql.{NAMESPACE}.svc"
    service = result.one("Service", f"{RELEASE}-mailpoll-postgresql")
    assert service["spec"]["ports"][0]["port"] == 5432
    # The operator connects to it through the generated Secret, without TLS (the bundled
    # server has none).
    env = container_env(pod_spec(result.one("Deployment"))["containers"][0])
    assert {ref[0] for ref in secret_refs(env).values()} == {secret["metadata"]["name"]}
    assert env["PGSSLMODE"]["value"] == "disable"
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


# --- Service, ServiceMonitor, PDB, NOTES ---------------------------------------------------------------


def test_the_metrics_service_and_service_monitor() -> None:
    result = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}})
    service = result.one("Service")
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8080, "targetPort": "http", "protocol": "TCP"},
        {"name": "https-admission", "port": 443, "targetPort": "admission", "protocol": "TCP"},
    ]
    monitor = result.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert not render().of_kind("ServiceMonitor")


def test_the_pod_disruption_budget() -> None:
    pdb = render().one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert not render({"podDisruptionBudget": {"enabled": False}}).of_kind("PodDisruptionBudget")


def test_notes_give_the_next_steps() -> None:
    notes = render().notes
    for step in (
        "create secret generic mailpoll-database",
        "create secret generic graph-credentials",
        "kind: MailboxPoll",
        "mailpoll.dev/poll-requested-at",
        "/metrics",
        f"rollout status deployment/{RELEASE}-mailpoll",
    ):
        assert step in notes, f"NOTES.txt lacks {step!r}"
    assert "-n team-a" in render({"watchNamespaces": ["team-a"]}).notes


def test_the_packaged_chart_renders_the_same(tmp_path) -> None:
    # What `helm package` ships must carry the CRD copy and render like the directory does.
    archive = helm.package(CHART_DIR, destination=tmp_path)
    # cert-manager's certificate: Helm would generate a new CA at every render.
    values = {
        "postgresql": {"enabled": False},
        "watchNamespaces": ["team-a"],
        "admissionWebhook": {"certManager": {"enabled": True}},
    }
    with helm.Chart.load(archive) as packaged:
        assert packaged.version == "0.1.0"
        from_archive = packaged.render(values, name=RELEASE, namespace=NAMESPACE)
    from_directory = render(values).raw
    assert from_archive == from_directory
    assert any("CustomResourceDefinition" in text for text in from_archive.values())
