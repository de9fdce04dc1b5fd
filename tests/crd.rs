//! The CRD is part of the public contract: the committed file matches the code, and the
//! schema rejects every invalid spec with a message that names the field.

use kube::CustomResourceExt;
use mailpoll::resource::{MailboxPoll, crd_yaml};
use mailpoll_testkit::crd_validation::CrdValidator;
use serde_json::{Value, json};

const COMMITTED_CRD: &str = include_str!("../crds/mailboxpoll.yaml");
const README: &str = include_str!("../README.md");

fn validator() -> CrdValidator {
    CrdValidator::from_crd(&MailboxPoll::crd(), "v1alpha1").expect("the CRD's CEL rules compile")
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "mailpoll.dev/v1alpha1",
        "kind": "MailboxPoll",
        "metadata": {"name": "support-inbox", "namespace": "default"},
        "spec": spec,
    })
}

fn valid_spec() -> Value {
    json!({
        "mailbox": "support@contoso.com",
        "folder": "inbox",
        "interval": "1h30m",
        "credentialsSecretRef": {"name": "graph-credentials"},
        "delivery": {"webhook": {"url": "https://hooks.example.com/mail", "signingSecretRef": {"name": "hook"}}},
        "afterDelivery": {"markAsRead": true, "moveToFolder": "archive"},
        "maxAttempts": 8
    })
}

#[test]
fn committed_crd_matches_the_code() {
    let generated = crd_yaml().expect("CRD renders");
    assert!(
        generated == COMMITTED_CRD,
        "crds/mailboxpoll.yaml is out of date: regenerate it with `cargo run -q -- crd > crds/mailboxpoll.yaml`"
    );
}

#[test]
fn committed_crd_is_structural_and_complete() {
    let crd: Value = serde_saphyr::from_str(COMMITTED_CRD).expect("committed CRD is YAML");
    assert_eq!(crd["spec"]["group"], "mailpoll.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["mbp"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns = |wide: bool| -> Vec<&str> {
        version["additionalPrinterColumns"]
            .as_array()
            .expect("printer columns")
            .iter()
            .filter(|c| (c["priority"].as_i64().unwrap_or(0) > 0) == wide)
            .filter_map(|c| c["name"].as_str())
            .collect()
    };
    assert_eq!(
        columns(false),
        [
            "Mailbox",
            "Interval",
            "Ready",
            "Reason",
            "Suspended",
            "Last Poll",
            "Delivered",
            "Age"
        ]
    );
    assert_eq!(
        columns(true),
        ["Folder", "Next Poll", "Pending", "Failed", "Degraded"],
        "shown with -o wide"
    );
    // `kubectl explain` describes every status field in mailpoll's words.
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    for (field, schema) in status.as_object().expect("status fields") {
        let description = schema["description"].as_str().unwrap_or_default();
        assert!(
            !description.is_empty() && !description.contains("Time is a wrapper"),
            "status.{field} needs a description of its own: {description:?}"
        );
    }
    let conditions =
        &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn valid_specs_pass_and_get_defaults() {
    let v = validator();
    v.validate(&object(valid_spec()), None, true)
        .expect("full spec is valid");
    let minimal = v
        .validate(
            &object(
                json!({"mailbox": "ops@contoso.com", "credentialsSecretRef": {"name": "graph"}}),
            ),
            None,
            true,
        )
        .expect("minimal spec is valid");
    assert_eq!(minimal["spec"]["folder"], "inbox");
    assert_eq!(minimal["spec"]["interval"], "5m");
    assert_eq!(minimal["spec"]["maxAttempts"], 8);
    for url in [
        "http://localhost:8080/hook",
        "http://127.0.0.1/hook",
        "http://[::1]:9000/",
        "http://receiver.mail.svc/hook",
        "http://receiver.mail.svc.cluster.local:8080/hook",
        "https://example.com",
    ] {
        let mut spec = valid_spec();
        spec["delivery"]["webhook"]["url"] = json!(url);
        v.validate(&object(spec), None, true)
            .unwrap_or_else(|e| panic!("{url} should be accepted: {e:?}"));
    }
    for interval in ["10s", "30s", "5m", "24h", "23h59m59s"] {
        let mut spec = valid_spec();
        spec["interval"] = json!(interval);
        v.validate(&object(spec), None, true)
            .unwrap_or_else(|e| panic!("interval {interval} should be accepted: {e:?}"));
    }
}

#[test]
fn invalid_specs_are_rejected_with_a_message_naming_the_field() {
    let v = validator();
    // (case, JSON pointer into the spec, new value or None to remove the field, expected message)
    let cases: Vec<(&str, &str, Option<Value>, &str)> = vec![
        (
            "empty mailbox",
            "/mailbox",
            Some(json!("")),
            "spec.mailbox must not be empty",
        ),
        (
            "long mailbox",
            "/mailbox",
            Some(json!("a".repeat(321))),
            "spec.mailbox",
        ),
        (
            "interval 5s",
            "/interval",
            Some(json!("5s")),
            "spec.interval must be between 10s and 24h",
        ),
        (
            "interval 25h",
            "/interval",
            Some(json!("25h")),
            "spec.interval must be between 10s and 24h",
        ),
        (
            "interval 2d",
            "/interval",
            Some(json!("2d")),
            "spec.interval must be a duration",
        ),
        (
            "interval often",
            "/interval",
            Some(json!("often")),
            "spec.interval must be a duration",
        ),
        (
            "webhook ftp",
            "/delivery/webhook/url",
            Some(json!("ftp://x")),
            "spec.delivery.webhook.url must be an https:// URL",
        ),
        (
            "webhook plain http to the internet",
            "/delivery/webhook/url",
            Some(json!("http://example.com/hook")),
            "spec.delivery.webhook.url must be an https:// URL",
        ),
        (
            "webhook http to a host that only looks in-cluster",
            "/delivery/webhook/url",
            Some(json!("http://evil.svc.example.com/hook")),
            "spec.delivery.webhook.url must be an https:// URL",
        ),
        (
            "maxAttempts 0",
            "/maxAttempts",
            Some(json!(0)),
            "spec.maxAttempts must be between 1 and 100",
        ),
        (
            "maxAttempts 101",
            "/maxAttempts",
            Some(json!(101)),
            "spec.maxAttempts must be between 1 and 100",
        ),
        (
            "maxAttempts as text",
            "/maxAttempts",
            Some(json!("eight")),
            "spec.maxAttempts in body must be of type integer",
        ),
        (
            "delivery.maxConcurrent 0",
            "/delivery",
            Some(json!({"maxConcurrent": 0})),
            "spec.delivery.maxConcurrent must be between 1 and 1000",
        ),
        (
            "delivery.maxConcurrent 1001",
            "/delivery",
            Some(json!({"maxConcurrent": 1001})),
            "spec.delivery.maxConcurrent must be between 1 and 1000",
        ),
        (
            "no credentials",
            "/credentialsSecretRef",
            None,
            "spec needs credentials: set one of spec.credentialsSecretRef (client secret), spec.certificate or spec.workloadIdentity",
        ),
        (
            "a certificate besides the client secret",
            "/certificate",
            Some(json!({"secretRef": {"name": "graph-certificate"}})),
            "spec.credentialsSecretRef, spec.certificate and spec.workloadIdentity are alternatives: set exactly one",
        ),
        (
            "workload identity besides the client secret",
            "/workloadIdentity",
            Some(json!({})),
            "spec.credentialsSecretRef, spec.certificate and spec.workloadIdentity are alternatives: set exactly one",
        ),
    ];
    for (name, pointer, value, expected) in cases {
        let mut spec = valid_spec();
        match value {
            Some(value) => match spec.pointer_mut(pointer) {
                Some(field) => *field = value,
                // A top-level field the valid spec lacks: added.
                None => {
                    spec[pointer.trim_start_matches('/')] = value;
                }
            },
            None => {
                let key = pointer.trim_start_matches('/');
                spec.as_object_mut()
                    .and_then(|m| m.remove(key))
                    .expect("field exists in the valid spec");
            }
        }
        let errors = v
            .validate(&object(spec), None, true)
            .err()
            .unwrap_or_else(|| panic!("{name}: should be rejected"));
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            rendered.iter().any(|m| m.contains(expected)),
            "{name}: expected a message containing {expected:?}, got {rendered:?}"
        );
    }
}

/// spec.startFrom takes all, now or an RFC 3339 time; spec.filter is bounded and not blank
/// (its syntax and types are checked by the admission webhook and the operator: condition InvalidFilter).
#[test]
fn start_from_and_filter_are_checked_by_the_schema() {
    let v = validator();
    let with = |field: &str, value: Value| {
        let mut spec = valid_spec();
        spec[field] = value;
        v.validate(&object(spec), None, true)
    };
    for start in [
        "all",
        "now",
        "2026-12-01T00:00:00Z",
        "2026-12-01t09:30:00.250+01:00",
        "1999-12-31T23:59:59-08:00",
    ] {
        with("startFrom", json!(start))
            .unwrap_or_else(|e| panic!("startFrom {start} should be accepted: {e:?}"));
    }
    for start in [
        "",
        "Now",
        "yesterday",
        "2026-12-01",
        "2026-12-01T00:00:00",
        "2026-13-01T00:00:00Z",
        "2026-12-01T24:00:00Z",
        "2026-12-01 00:00:00Z",
    ] {
        let errors = with("startFrom", json!(start))
            .err()
            .unwrap_or_else(|| panic!("startFrom {start:?} should be rejected"));
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            rendered.iter().any(|m| m.contains(
                "spec.startFrom must be all, now or an RFC 3339 time such as 2026-12-01T00:00:00Z"
            )),
            "startFrom {start:?}: {rendered:?}"
        );
    }
    with(
        "filter",
        json!("message.hasAttachments && message.importance == 'high'"),
    )
    .expect("a filter is accepted");
    for (filter, expected) in [
        (json!("   "), "spec.filter must not be empty when set"),
        (json!("x".repeat(4097)), "spec.filter"),
    ] {
        let errors = with("filter", filter)
            .err()
            .unwrap_or_else(|| panic!("{expected}: should be rejected"));
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            rendered.iter().any(|m| m.contains(expected)),
            "{expected}: {rendered:?}"
        );
    }
}

#[test]
fn a_webhook_takes_its_url_from_the_spec_or_a_secret_never_both() {
    let v = validator();
    let with_webhook = |webhook: Value| {
        let mut spec = valid_spec();
        spec["delivery"]["webhook"] = webhook;
        v.validate(&object(spec), None, true)
            .err()
            .map(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())
    };
    let exactly_one = "spec.delivery.webhook needs exactly one of url and urlSecretRef";
    assert_eq!(
        with_webhook(json!({
            "urlSecretRef": {"name": "logic-app"},
            "headersSecretRef": {"name": "hook-headers"},
            "signingSecretRef": {"name": "hook"}
        })),
        None
    );
    for (case, webhook) in [
        (
            "both",
            json!({"url": "https://hooks.example.com/mail", "urlSecretRef": {"name": "logic-app"}}),
        ),
        ("neither", json!({"signingSecretRef": {"name": "hook"}})),
    ] {
        let errors = with_webhook(webhook).unwrap_or_else(|| panic!("{case}: rejected"));
        assert!(
            errors.iter().any(|e| e.contains(exactly_one)),
            "{case}: {errors:?}"
        );
    }
    let errors =
        with_webhook(json!({"url": "https://h.example.com", "headersSecretRef": {"name": ""}}))
            .expect("an empty Secret name is rejected");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("secret reference name must not be empty")),
        "{errors:?}"
    );
}

#[test]
fn each_credential_kind_is_valid_alone_and_defaults_its_keys() {
    let v = validator();
    let with = |field: &str, value: Value| {
        let mut spec = valid_spec();
        spec.as_object_mut()
            .expect("object")
            .remove("credentialsSecretRef");
        spec[field] = value;
        v.validate(&object(spec), None, true)
    };
    let certificate = with(
        "certificate",
        json!({"clientId": "app", "secretRef": {"name": "graph-certificate"}}),
    )
    .expect("certificate credentials");
    let reference = &certificate["spec"]["certificate"]["secretRef"];
    assert_eq!(reference["certificateKey"], "tls.crt");
    assert_eq!(reference["privateKeyKey"], "tls.key");
    assert_eq!(reference["tenantIdKey"], "tenantId");
    with("workloadIdentity", json!({})).expect("workload identity from the pod");
    with(
        "workloadIdentity",
        json!({"clientId": "app", "tenantId": "tenant"}),
    )
    .expect("workload identity with ids");
    for (field, value, message) in [
        (
            "certificate",
            json!({"secretRef": {"name": ""}}),
            "spec.certificate.secretRef.name must not be empty",
        ),
        (
            "certificate",
            json!({"clientId": "", "secretRef": {"name": "c"}}),
            "spec.certificate.clientId must not be empty when set",
        ),
        (
            "workloadIdentity",
            json!({"tenantId": ""}),
            "spec.workloadIdentity.tenantId must not be empty when set",
        ),
    ] {
        let errors = with(field, value).expect_err("rejected");
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            rendered.iter().any(|m| m.contains(message)),
            "expected {message:?}, got {rendered:?}"
        );
    }
}

#[test]
fn readme_example_is_valid() {
    let example = README
        .split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("kind: MailboxPoll"))
        .expect("README has a yaml block with a MailboxPoll");
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(example).expect("README example is YAML");
    let polls: Vec<&Value> = documents
        .iter()
        .filter(|d| d["kind"] == "MailboxPoll")
        .collect();
    assert!(!polls.is_empty(), "the README example holds a MailboxPoll");
    for poll in polls {
        validator().validate(poll, None, true).unwrap_or_else(|e| {
            panic!(
                "README example is rejected: {:?}",
                e.iter().map(ToString::to_string).collect::<Vec<_>>()
            )
        });
    }
}

#[test]
fn webhook_formats_and_attachment_limits_are_checked_at_apply_time() {
    let v = validator();
    let with = |fields: Value| {
        let mut spec = valid_spec();
        for (name, value) in fields.as_object().expect("fields").clone() {
            spec["delivery"]["webhook"][name] = value;
        }
        v.validate(&object(spec), None, true)
    };
    let defaulted = with(json!({})).expect("no content fields is valid");
    let webhook = &defaulted["spec"]["delivery"]["webhook"];
    assert_eq!(webhook["format"], "json");
    assert_eq!(webhook["attachments"], "none");
    assert_eq!(webhook["maxAttachmentBytes"], 10_485_760);
    assert_eq!(webhook["maxMessageBytes"], 26_214_400);
    for valid in [
        json!({"format": "cloudevents", "attachments": "inline"}),
        json!({"attachments": "metadata", "maxAttachmentBytes": 1, "maxMessageBytes": 52_428_800}),
        json!({"format": "mime", "maxMessageBytes": 1_000_000}),
    ] {
        with(valid.clone()).unwrap_or_else(|e| panic!("{valid} should be accepted: {e:?}"));
    }
    for (invalid, expected) in [
        (json!({"format": "xml"}), "spec.delivery.webhook.format"),
        (
            json!({"attachments": "all"}),
            "spec.delivery.webhook.attachments",
        ),
        (
            json!({"format": "mime", "attachments": "inline"}),
            "spec.delivery.webhook.attachments must be none with format mime",
        ),
        (
            json!({"maxAttachmentBytes": 0}),
            "spec.delivery.webhook.maxAttachmentBytes",
        ),
        (
            json!({"maxMessageBytes": 52_428_801}),
            "spec.delivery.webhook.maxMessageBytes",
        ),
    ] {
        let errors = with(invalid.clone())
            .err()
            .unwrap_or_else(|| panic!("{invalid} should be rejected"));
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            rendered.iter().any(|m| m.contains(expected)),
            "{invalid}: expected a message containing {expected:?}, got {rendered:?}"
        );
    }
}
