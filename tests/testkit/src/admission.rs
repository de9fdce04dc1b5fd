//! The admission webhook in tests: a fixed test CA and a serving certificate for `localhost`
//! and `127.0.0.1` (valid until 2126, so no test depends on the date), and the
//! ValidatingWebhookConfiguration the chart installs, pointed at a URL instead of a Service.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use serde_json::{Value, json};

/// The test CA's certificate (its key is not kept: nothing else may be signed by it).
pub const TEST_CA_PEM: &str = include_str!("../certs/ca.crt");
/// The serving certificate, signed by [`TEST_CA_PEM`], for `localhost` and `127.0.0.1`.
pub const TEST_CERT_PEM: &str = include_str!("../certs/tls.crt");
/// The serving certificate's private key (P-256, PKCS#8).
pub const TEST_KEY_PEM: &str = include_str!("../certs/tls.key");

/// The webhook's name in the configuration, as the chart names it.
pub const WEBHOOK_NAME: &str = "mailboxpolls.mailpoll.dev";

/// Writes the serving certificate and key into `dir` as `tls.crt` and `tls.key`, as a
/// mounted Secret holds them.
pub fn write_test_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, TEST_CERT_PEM).with_context(|| format!("writing {}", cert.display()))?;
    std::fs::write(&key, TEST_KEY_PEM).with_context(|| format!("writing {}", key.display()))?;
    Ok((cert, key))
}

/// The test CA as a `caBundle` (base64 of the PEM).
pub fn test_ca_bundle() -> String {
    base64::engine::general_purpose::STANDARD.encode(TEST_CA_PEM)
}

/// A ValidatingWebhookConfiguration sending MailboxPoll creates and updates to `url`,
/// trusting the test CA; `failure_policy` is `Ignore` or `Fail`.
pub fn webhook_configuration(
    name: &str,
    url: &str,
    failure_policy: &str,
    timeout_seconds: u32,
) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "timeoutSeconds": timeout_seconds,
            "failurePolicy": failure_policy,
            "clientConfig": {"url": url, "caBundle": test_ca_bundle()},
            "rules": [{
                "apiGroups": ["mailpoll.dev"],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["mailboxpolls"],
                "scope": "Namespaced"
            }]
        }]
    })
}

/// Creates `configuration` through the API (as `kubectl apply` would).
pub async fn register(client: &kube::Client, configuration: &Value) -> anyhow::Result<()> {
    let resource = kube::discovery::ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: "ValidatingWebhookConfiguration".into(),
        plural: "validatingwebhookconfigurations".into(),
    };
    let api: kube::Api<kube::core::DynamicObject> = kube::Api::all_with(client.clone(), &resource);
    let object: kube::core::DynamicObject =
        serde_json::from_value(configuration.clone()).context("a configuration object")?;
    api.create(&kube::api::PostParams::default(), &object)
        .await
        .context("creating the ValidatingWebhookConfiguration")?;
    Ok(())
}
