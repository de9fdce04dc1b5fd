"""The validating admission webhook: registered for MailboxPoll creates and updates, served by the
operator over TLS on its own port behind the Service, with a Helm-generated CA and serving
certificate (kept on upgrades) or a cert-manager Certificate whose CA cert-manager injects."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from chartkit import NAMESPACE, RELEASE, container_env, pod_spec, render

FULLNAME = f"{RELEASE}-mailpoll"
SECRET = f"{FULLNAME}-admission-tls"
SERVICE_HOST = f"{FULLNAME}.{NAMESPACE}.svc"


def webhook(rendered: Any) -> dict[str, Any]:
    configuration = rendered.one("ValidatingWebhookConfiguration")
    assert configuration["metadata"]["name"] == f"{FULLNAME}-{NAMESPACE}", "one per release and namespace"
    (hook,) = configuration["webhooks"]
    return hook


def operator_container(rendered: Any) -> dict[str, Any]:
    (container,) = pod_spec(rendered.one("Deployment"))["containers"]
    return container


def test_enabled_by_default_for_mailboxpoll_creates_and_updates() -> None:
    hook = webhook(render())
    assert hook["name"] == "mailboxpolls.mailpoll.dev"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Ignore", "kubectl apply keeps working while the operator is down"
    assert hook["timeoutSeconds"] == 5
    assert hook["rules"] == [
        {
            "apiGroups": ["mailpoll.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["mailboxpolls"],
            "scope": "Namespaced",
        }
    ]
    assert hook["clientConfig"]["service"] == {
        "name": FULLNAME,
        "namespace": NAMESPACE,
        "path": "/validate-mailboxpoll",
        "port": 443,
    }
    assert "namespaceSelector" not in hook, "every namespace when all are watched"


def test_the_operator_serves_it_over_tls_from_the_mounted_secret() -> None:
    rendered = render()
    container = operator_container(rendered)
    env = container_env(container)
    assert env["MAILPOLL_ADMISSION_ADDR"]["value"] == "0.0.0.0:9443"
    assert env["MAILPOLL_ADMISSION_TLS_CERT"]["value"] == "/etc/mailpoll/admission-tls/tls.crt"
    assert env["MAILPOLL_ADMISSION_TLS_KEY"]["value"] == "/etc/mailpoll/admission-tls/tls.key"
    assert {"name": "admission", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["admission-tls"] == {"name": "admission-tls", "mountPath": "/etc/mailpoll/admission-tls", "readOnly": True}
    volumes = {v["name"]: v for v in pod_spec(rendered.one("Deployment"))["volumes"]}
    assert volumes["admission-tls"]["secret"] == {"secretName": SECRET}
    ports = rendered.one("Service")["spec"]["ports"]
    assert {"name": "https-admission", "port": 443, "targetPort": "admission", "protocol": "TCP"} in ports


def test_helm_generates_a_ca_and_a_serving_certificate_for_the_service() -> None:
    rendered = render()
    secret = rendered.one("Secret", SECRET)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    ca = base64.b64decode(secret["data"]["ca.crt"]).decode()
    assert ca.startswith("-----BEGIN CERTIFICATE-----")
    assert base64.b64decode(secret["data"]["tls.key"]).decode().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert webhook(rendered)["clientConfig"]["caBundle"] == secret["data"]["ca.crt"], "the CA that signed the certificate"
    assert secret["data"]["tls.crt"] != secret["data"]["ca.crt"]
    assert not rendered.of_kind("Certificate")


def test_cert_manager_issues_the_certificate_and_injects_the_ca() -> None:
    rendered = render({"admissionWebhook": {"certManager": {"enabled": True}}})
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == SECRET], "cert-manager writes it"
    certificate = rendered.one("Certificate")
    assert certificate["spec"]["secretName"] == SECRET
    assert SERVICE_HOST in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"] == {"name": f"{FULLNAME}-admission-selfsigned", "kind": "Issuer", "group": "cert-manager.io"}
    assert rendered.one("Issuer")["spec"] == {"selfSigned": {}}
    configuration = rendered.one("ValidatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{certificate['metadata']['name']}"
    }
    assert "caBundle" not in webhook(rendered)["clientConfig"]


def test_cert_manager_with_an_issuer_of_the_cluster() -> None:
    issuer = {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    rendered = render({"admissionWebhook": {"certManager": {"enabled": True, "issuerRef": issuer}}})
    assert rendered.one("Certificate")["spec"]["issuerRef"] == issuer
    assert not rendered.of_kind("Issuer")


def test_failure_policy_timeout_and_watched_namespaces() -> None:
    rendered = render(
        {"admissionWebhook": {"failurePolicy": "Fail", "timeoutSeconds": 3}, "watchNamespaces": ["mail", "billing"]}
    )
    hook = webhook(rendered)
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] == 3
    assert hook["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["mail", "billing"]}]
    }


def test_disabled_renders_nothing_of_it() -> None:
    rendered = render({"admissionWebhook": {"enabled": False}})
    assert not rendered.of_kind("ValidatingWebhookConfiguration")
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == SECRET]
    env = container_env(operator_container(rendered))
    assert "MAILPOLL_ADMISSION_ADDR" not in env
    assert [p["name"] for p in rendered.one("Service")["spec"]["ports"]] == ["http-metrics"]


@pytest.mark.parametrize(
    "values",
    [
        {"failurePolicy": "Sometimes"},
        {"timeoutSeconds": 31},
        {"port": 0},
        {"certManager": {"enabled": True, "issuer": "x"}},
    ],
)
def test_the_schema_rejects_bad_settings(values: dict[str, Any]) -> None:
    with pytest.raises(Exception):
        render({"admissionWebhook": values})
