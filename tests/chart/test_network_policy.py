"""The optional NetworkPolicy: egress only where the operator must go, and clear errors when a
required address is missing."""

from __future__ import annotations

from typing import Any

import pytest

from chartkit import RELEASE, render

REQUIRED = {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}, "database": {"cidrs": ["10.1.2.3/32"]}}


def policy(values: dict[str, Any]) -> dict[str, Any]:
    rendered = render({"networkPolicy": values})
    return rendered.one("NetworkPolicy", f"{RELEASE}-mailpoll")


def egress_ports(rule: dict[str, Any]) -> list[tuple[int | str, str]]:
    return [(p["port"], p["protocol"]) for p in rule["ports"]]


def test_off_by_default() -> None:
    assert not render().of_kind("NetworkPolicy")


def test_it_selects_the_operator_pods_and_allows_only_the_needed_egress() -> None:
    spec = policy(REQUIRED)["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}]},
        {"ports": [{"port": "admission", "protocol": "TCP"}]},
    ], "probes, scrapes and the API server's admission calls"
    dns, api, database, microsoft = spec["egress"]
    assert egress_ports(dns) == [(53, "UDP"), (53, "TCP")]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert egress_ports(api) == [(443, "TCP"), (6443, "TCP")]
    assert database["to"] == [{"ipBlock": {"cidr": "10.1.2.3/32"}}]
    assert egress_ports(database) == [(5432, "TCP")]
    block = microsoft["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(block["except"]), "private and metadata ranges excluded"
    assert egress_ports(microsoft) == [(443, "TCP")]


def test_webhook_receivers_and_scrapers_are_added_when_listed() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"mailpoll.dev/receivers": "true"}}}]
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    spec = policy(
        {**REQUIRED, "metricsFrom": scrapers, "webhooks": {"cidrs": ["203.0.113.0/24"], "ports": [443, 8443], "peers": peers}}
    )["spec"]
    assert spec["ingress"][0]["from"] == scrapers
    outside, inside = spec["egress"][4:]
    assert outside["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    assert egress_ports(outside) == [(443, "TCP"), (8443, "TCP")]
    assert inside["to"] == peers
    assert egress_ports(inside) == [(80, "TCP"), (443, "TCP"), (8080, "TCP")]


def test_the_admission_port_is_opened_only_with_the_webhook_and_for_the_listed_peers() -> None:
    control_plane = [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    spec = policy({**REQUIRED, "admissionFrom": control_plane})["spec"]
    assert spec["ingress"][1] == {"ports": [{"port": "admission", "protocol": "TCP"}], "from": control_plane}
    without = render({"networkPolicy": REQUIRED, "admissionWebhook": {"enabled": False}})
    ingress = without.one("NetworkPolicy", f"{RELEASE}-mailpoll")["spec"]["ingress"]
    assert ingress == [{"ports": [{"port": "http", "protocol": "TCP"}]}]


def test_the_bundled_postgres_is_selected_by_its_labels() -> None:
    rendered = render({"postgresql": {"enabled": True}, "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}}})
    database = rendered.one("NetworkPolicy")["spec"]["egress"][2]
    assert database["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "postgresql"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"enabled": True, "database": {"cidrs": ["10.1.2.3/32"]}}, "networkPolicy.apiServer.cidrs"),
        ({"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}}, "networkPolicy.database.cidrs"),
    ],
)
def test_missing_addresses_fail_the_render_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        render({"networkPolicy": values})


def test_the_schema_rejects_a_malformed_cidr() -> None:
    with pytest.raises(Exception, match="cidrs"):
        render({"networkPolicy": {**REQUIRED, "webhooks": {"cidrs": ["hooks.example.com"]}}})
