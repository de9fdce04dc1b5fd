"""The optional PrometheusRule and Grafana dashboard, and the alerts' promtool unit tests."""

from __future__ import annotations

import json
import shutil
import subprocess

import yaml

from chartkit import CHART_DIR, REPO_ROOT, RELEASE, render

RULES = CHART_DIR / "files" / "prometheus-rules.yaml"
RULE_TESTS = REPO_ROOT / "tests" / "prometheus" / "rules_test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: scripts/test installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False)


def test_both_are_off_by_default() -> None:
    rendered = render()
    assert not rendered.of_kind("PrometheusRule")
    assert not [c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].endswith("dashboard")]


def test_the_prometheus_rule_carries_the_tested_rules() -> None:
    rule = render({"prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}}).one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))
    alerts = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert alerts == [
        "MailpollMailboxPollNotReady",
        "MailpollPollsStale",
        "MailpollDeadTasks",
        "MailpollMessagesFailing",
        "MailpollQueueBacklog",
        "MailpollNoLeader",
    ]
    # Prometheus' own template syntax survives Helm untouched.
    assert "{{ $labels.namespace }}" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]


def test_the_rules_pass_promtool_check_and_every_unit_test(tmp_path) -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # The rendered PrometheusRule's spec is a rules file promtool accepts as well.
    rule = render({"prometheusRule": {"enabled": True}}).one("PrometheusRule")
    rendered_rules = tmp_path / "rendered-rules.yaml"
    rendered_rules.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    assert promtool("check", "rules", str(rendered_rules)).returncode == 0


def test_a_broken_alert_fails_its_unit_test(tmp_path) -> None:
    # The tests can fail: with the stale threshold raised tenfold, the stale alert stays quiet.
    broken = tmp_path / "rules.yaml"
    broken.write_text(RULES.read_text(encoding="utf-8").replace("> 3 * max", "> 30 * max"), encoding="utf-8")
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(
        RULE_TESTS.read_text(encoding="utf-8").replace("../../charts/mailpoll/files/prometheus-rules.yaml", str(broken)),
        encoding="utf-8",
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode != 0
    assert "MailpollPollsStale" in result.stdout + result.stderr


def test_the_dashboard_config_map_holds_the_dashboard() -> None:
    rendered = render(
        {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "mailpoll"}, "namespace": "monitoring"}}
    )
    config_map = rendered.one("ConfigMap", f"{RELEASE}-mailpoll-dashboard")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "mailpoll"}
    dashboard = json.loads(config_map["data"]["mailpoll.json"])
    assert dashboard == json.loads((CHART_DIR / "files" / "dashboard.json").read_text(encoding="utf-8"))
