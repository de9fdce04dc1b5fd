"""Graph credentials in the chart: the national cloud URLs and Azure workload identity, set with
first-class values (never through operator.extraEnv)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from chartkit import NAMESPACE, RELEASE, container_env, load_chart, pod_spec, render

TOKEN_DIR = "/var/run/secrets/azure/tokens"


def operator(values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The Deployment, its operator container's environment, and the ServiceAccount."""
    rendered = render(values or {})
    deployment = rendered.one("Deployment")
    container = pod_spec(deployment)["containers"][0]
    assert not container_env(container).keys() & {"X"}
    return deployment, container_env(container), rendered.one("ServiceAccount")


def test_the_public_cloud_by_default_and_no_workload_identity() -> None:
    deployment, env, account = operator()
    assert env["MAILPOLL_GRAPH_AUTHORITY_URL"]["value"] == "https://login.microsoftonline.com"
    assert env["MAILPOLL_GRAPH_URL"]["value"] == "https://graph.microsoft.com"
    assert not [name for name in env if name.startswith("AZURE_")]
    assert "MAILPOLL_WORKLOAD_IDENTITY_NAMESPACES" not in env
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "azure.workload.identity/use" not in labels
    assert "annotations" not in account["metadata"]
    volumes = [volume["name"] for volume in pod_spec(deployment)["volumes"]]
    assert volumes == ["tmp", "admission-tls"]


@pytest.mark.parametrize(
    ("cloud", "authority", "graph"),
    [
        ("public", "https://login.microsoftonline.com", "https://graph.microsoft.com"),
        ("usGov", "https://login.microsoftonline.us", "https://graph.microsoft.us"),
        ("usGovDoD", "https://login.microsoftonline.us", "https://dod-graph.microsoft.us"),
        ("china", "https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn"),
    ],
)
def test_each_national_cloud_sets_both_urls(cloud: str, authority: str, graph: str) -> None:
    _, env, _ = operator({"cloud": {"name": cloud}})
    assert env["MAILPOLL_GRAPH_AUTHORITY_URL"]["value"] == authority
    assert env["MAILPOLL_GRAPH_URL"]["value"] == graph


def test_explicit_cloud_urls_win_over_the_preset() -> None:
    _, env, _ = operator({"cloud": {"name": "usGov", "graphUrl": "https://graph.example.test"}})
    assert env["MAILPOLL_GRAPH_AUTHORITY_URL"]["value"] == "https://login.microsoftonline.us"
    assert env["MAILPOLL_GRAPH_URL"]["value"] == "https://graph.example.test"


@pytest.mark.parametrize(
    "values",
    [
        {"cloud": {"name": "mars"}},
        {"cloud": {"graphUrl": "http://graph.example.test"}},
        {"cloud": {"authorityUrl": "login.microsoftonline.com"}},
        {"workloadIdentity": {"enabled": "yes"}},
        {"workloadIdentity": {"tokenExpirationSeconds": 60}},
        {"workloadIdentity": {"namespaces": ["Team_A"]}},
        {"workloadIdentity": {"clientID": "typo"}},
    ],
)
def test_the_schema_rejects_bad_credential_values(values: dict[str, Any]) -> None:
    with load_chart() as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(values))


def test_workload_identity_through_the_aks_webhook() -> None:
    deployment, env, account = operator(
        {
            "workloadIdentity": {
                "enabled": True,
                "clientId": "11111111-1111-1111-1111-111111111111",
                "tenantId": "22222222-2222-2222-2222-222222222222",
                "namespaces": ["support", "billing"],
            },
            "serviceAccount": {"annotations": {"example.com/team": "mail"}},
        }
    )
    # The webhook mutates only labelled pods and reads the ids from the ServiceAccount.
    assert deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert account["metadata"]["annotations"] == {
        "azure.workload.identity/client-id": "11111111-1111-1111-1111-111111111111",
        "azure.workload.identity/tenant-id": "22222222-2222-2222-2222-222222222222",
        "example.com/team": "mail",
    }
    assert env["MAILPOLL_WORKLOAD_IDENTITY_NAMESPACES"]["value"] == "support,billing"
    # The webhook injects the token volume and the AZURE_* variables itself.
    assert not [name for name in env if name.startswith("AZURE_")]
    assert [volume["name"] for volume in pod_spec(deployment)["volumes"]] == ["tmp", "admission-tls"]


def test_workload_identity_without_the_webhook_mounts_a_projected_token() -> None:
    deployment, env, account = operator(
        {
            "workloadIdentity": {
                "enabled": True,
                "useWebhook": False,
                "clientId": "app-id",
                "tenantId": "tenant-id",
                "tokenExpirationSeconds": 7200,
            }
        }
    )
    assert "azure.workload.identity/use" not in deployment["spec"]["template"]["metadata"]["labels"]
    spec = pod_spec(deployment)
    volume = next(volume for volume in spec["volumes"] if volume["name"] == "azure-identity-token")
    assert volume["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "api://AzureADTokenExchange",
                "expirationSeconds": 7200,
                "path": "azure-identity-token",
            }
        }
    ]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "azure-identity-token")
    assert mount == {"name": "azure-identity-token", "mountPath": TOKEN_DIR, "readOnly": True}
    assert env["AZURE_FEDERATED_TOKEN_FILE"]["value"] == f"{TOKEN_DIR}/azure-identity-token"
    assert env["AZURE_CLIENT_ID"]["value"] == "app-id"
    assert env["AZURE_TENANT_ID"]["value"] == "tenant-id"
    # The token is the ServiceAccount's: the subject of the app's federated credential.
    assert spec["serviceAccountName"] == account["metadata"]["name"] == f"{RELEASE}-mailpoll"
    assert account["metadata"]["namespace"] == NAMESPACE


def test_workload_identity_without_the_webhook_needs_the_tenant() -> None:
    with pytest.raises(helm.HelmError, match="workloadIdentity.tenantId is required"):
        render({"workloadIdentity": {"enabled": True, "useWebhook": False, "clientId": "app-id"}})


def test_notes_name_the_federated_subject_and_the_guide() -> None:
    notes = render({"workloadIdentity": {"enabled": True, "clientId": "app-id"}}).notes
    assert f"system:serviceaccount:{NAMESPACE}:{RELEASE}-mailpoll" in notes
    assert "docs/entra.md" in notes
    assert "create secret tls" in render().notes
