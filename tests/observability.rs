//! The chart's dashboard and alerts read only what the operator exports, and every alert has a
//! `promtool` unit test (tests/prometheus, run by scripts/test).

use std::collections::BTreeSet;
use std::time::Duration;

use mailpoll::telemetry::metrics::{KindLabels, MailboxPollSample, Metrics, QueueLabels};
use uuid::Uuid;

const DASHBOARD: &str = include_str!("../charts/mailpoll/files/dashboard.json");
const RULES: &str = include_str!("../charts/mailpoll/files/prometheus-rules.yaml");
const RULE_TESTS: &str = include_str!("prometheus/rules_test.yaml");

/// Sample names the operator exports once it has done everything once, from the `# TYPE` lines
/// of its exposition (a labelled family shows only once it has a sample).
fn exported() -> BTreeSet<String> {
    let metrics = Metrics::new();
    metrics.reconciled(Duration::from_millis(5), Some("SecretNotFound"));
    metrics.poll_finished(Some("AccessDenied"));
    metrics.graph_response(Some(200), Duration::from_millis(40));
    metrics.webhook_posted("2xx", Some(Duration::from_millis(30)));
    let queue = QueueLabels {
        kind: "poll".into(),
        state: "dead".into(),
    };
    metrics.queue_tasks.get_or_create(&queue).set(1);
    let kind = KindLabels {
        kind: "poll".into(),
    };
    metrics
        .queue_oldest_pending_seconds
        .get_or_create(&kind)
        .set(3.0);
    metrics.observe_mailbox_poll(
        Uuid::nil(),
        &MailboxPollSample {
            namespace: "support".into(),
            name: "inbox".into(),
            ready: true,
            reason: "Polling".into(),
            suspended: false,
            interval: Duration::from_secs(60),
            last_success: None,
            last_poll: None,
            delivered: 1,
            pending: 0,
            failed: 0,
        },
    );
    let text = metrics.encode().expect("metrics encode");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Every `mailpoll_…` name a text mentions.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("mailpoll_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn the_dashboard_and_the_alerts_query_only_exported_metrics() {
    let exported = exported();
    assert!(
        exported.contains("mailpoll_mailboxpoll_ready"),
        "{exported:?}"
    );
    for (what, text) in [
        ("dashboard.json", DASHBOARD),
        ("prometheus-rules.yaml", RULES),
    ] {
        let unknown: Vec<String> = mentioned(text)
            .into_iter()
            .filter(|name| !exported.contains(name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{what} queries metrics the operator does not export: {unknown:?}"
        );
    }
}

#[test]
fn every_alert_has_a_promtool_test() {
    let alerts: Vec<&str> = RULES
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in alerts {
        assert!(
            RULE_TESTS.contains(&format!("alertname: {alert}")),
            "tests/prometheus/rules_test.yaml has no case for {alert}"
        );
    }
}

#[test]
fn the_dashboard_is_valid_json_with_a_datasource_variable() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    assert_eq!(dashboard["uid"], "mailpoll");
    assert_eq!(dashboard["templating"]["list"][0]["name"], "datasource");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        assert!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            panel["title"]
        );
    }
}
