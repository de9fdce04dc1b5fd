"""Change notifications in the chart: the public URL and lifetime reach the operator, and the
optional Ingress exposes only /notifications, on publicUrl's host."""

from __future__ import annotations

from typing import Any

import pytest

from chartkit import RELEASE, render

PUBLIC_URL = "https://mailpoll.example.com/notifications"


def env_of(values: dict[str, Any]) -> dict[str, str]:
    deployment = render(values).one("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value") for item in container["env"]}


def test_off_by_default_polling_only() -> None:
    env = env_of({})
    assert "MAILPOLL_NOTIFICATION_URL" not in env
    assert env["MAILPOLL_SUBSCRIPTION_LIFETIME_MINUTES"] == "10000"
    assert not render().of_kind("Ingress")


def test_the_public_url_reaches_the_operator() -> None:
    env = env_of({"notifications": {"publicUrl": PUBLIC_URL, "subscriptionLifetimeMinutes": 4320}})
    assert env["MAILPOLL_NOTIFICATION_URL"] == PUBLIC_URL
    assert env["MAILPOLL_SUBSCRIPTION_LIFETIME_MINUTES"] == "4320"


def test_the_ingress_routes_only_the_notification_path() -> None:
    tls = [{"secretName": "mailpoll-notifications-tls", "hosts": ["mailpoll.example.com"]}]
    rendered = render(
        {
            "notifications": {
                "publicUrl": PUBLIC_URL,
                "ingress": {
                    "enabled": True,
                    "className": "nginx",
                    "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
                    "tls": tls,
                },
            }
        }
    )
    ingress = rendered.one("Ingress", f"{RELEASE}-mailpoll-notifications")
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == tls
    assert ingress["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    (rule,) = spec["rules"]
    assert rule["host"] == "mailpoll.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/notifications"
    assert path["pathType"] == "Prefix"
    service = rendered.one("Service")
    assert path["backend"]["service"] == {
        "name": service["metadata"]["name"],
        "port": {"number": service["spec"]["ports"][0]["port"]},
    }


def test_an_ingress_without_a_public_url_is_refused() -> None:
    with pytest.raises(Exception, match="notifications.publicUrl"):
        render({"notifications": {"ingress": {"enabled": True}}})


@pytest.mark.parametrize(
    "values",
    [
        {"publicUrl": "https://mailpoll.example.com/hooks"},
        {"publicUrl": "https://user:pw@mailpoll.example.com/notifications"},
        {"subscriptionLifetimeMinutes": 10081},
        {"unknown": True},
    ],
)
def test_bad_values_are_refused_by_the_schema(values: dict[str, Any]) -> None:
    with pytest.raises(Exception):
        render({"notifications": values})
