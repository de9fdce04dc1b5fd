//! Validating admission webhooks, as kube-apiserver calls them: after the schema accepted a
//! create or update, every ValidatingWebhookConfiguration whose rule matches gets an
//! `admission.k8s.io/v1` AdmissionReview POSTed to its `clientConfig.url`, over https
//! trusting only its `caBundle`, within its `timeoutSeconds`. A denial becomes the request's
//! error; a webhook that cannot be called fails the request or is ignored, by its
//! `failurePolicy`. Not emulated: `clientConfig.service` (no cluster DNS here), namespace and
//! object selectors, `matchConditions`, mutating webhooks.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use super::resource::ResourceType;
use super::select::{FieldSelector, LabelSelector};
use super::status::{ApiError, group_resource};
use super::store::Store;

pub const GROUP: &str = "admissionregistration.k8s.io";
pub const VALIDATING_PLURAL: &str = "validatingwebhookconfigurations";

/// kube-apiserver's default and largest `timeoutSeconds`.
const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
const MAX_TIMEOUT_SECONDS: u64 = 30;

/// The write a webhook is asked about.
pub struct Attempt<'a> {
    pub rt: &'a ResourceType,
    pub namespace: &'a str,
    /// The object as it would be stored.
    pub object: &'a Value,
    /// The stored object an update replaces.
    pub old_object: Option<&'a Value>,
    pub create: bool,
    pub dry_run: bool,
    pub user: Option<&'a str>,
}

impl Attempt<'_> {
    fn operation(&self) -> &'static str {
        if self.create { "CREATE" } else { "UPDATE" }
    }

    fn name(&self) -> &str {
        self.object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// One webhook of a configuration, as far as the emulator reads it.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub name: String,
    pub url: Option<String>,
    pub ca_bundle: Option<String>,
    pub timeout: Duration,
    /// `Fail` (the v1 default) or `Ignore`.
    pub ignore_failures: bool,
    rules: Vec<Value>,
}

/// The webhooks of every stored ValidatingWebhookConfiguration.
pub fn configured(store: &Store) -> Vec<Webhook> {
    let Some(rt) = store.lookup(GROUP, "v1", VALIDATING_PLURAL) else {
        return Vec::new();
    };
    let (Ok(labels), Ok(fields)) = (
        LabelSelector::parse(""),
        FieldSelector::parse("", &rt.kind, &rt.api_version()),
    ) else {
        return Vec::new();
    };
    let Ok(page) = store.list(&rt, None, &labels, &fields, None, None) else {
        return Vec::new();
    };
    page.items
        .iter()
        .flat_map(|config| {
            config
                .get("webhooks")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .map(|hook| webhook(&hook))
        .collect()
}

fn webhook(hook: &Value) -> Webhook {
    let text = |pointer: &str| {
        hook.pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let seconds = hook
        .get("timeoutSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
        .clamp(1, MAX_TIMEOUT_SECONDS);
    Webhook {
        name: text("/name").unwrap_or_default(),
        url: text("/clientConfig/url"),
        ca_bundle: text("/clientConfig/caBundle"),
        timeout: Duration::from_secs(seconds),
        ignore_failures: text("/failurePolicy").as_deref() == Some("Ignore"),
        rules: hook
            .get("rules")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

impl Webhook {
    /// Whether a rule names this operation on this resource (the main resource, not a
    /// subresource).
    pub fn matches(&self, attempt: &Attempt<'_>) -> bool {
        let listed = |rule: &Value, field: &str, wanted: &str| {
            rule.get(field)
                .and_then(Value::as_array)
                .is_some_and(|items| items.iter().any(|i| i == "*" || i == wanted))
        };
        let scope_matches = |rule: &Value| match rule.get("scope").and_then(Value::as_str) {
            Some("Namespaced") => attempt.rt.namespaced,
            Some("Cluster") => !attempt.rt.namespaced,
            _ => true,
        };
        self.rules.iter().any(|rule| {
            listed(rule, "operations", attempt.operation())
                && listed(rule, "apiGroups", &attempt.rt.group)
                && listed(rule, "apiVersions", &attempt.rt.version)
                && listed(rule, "resources", &attempt.rt.plural)
                && scope_matches(rule)
        })
    }

    /// Asks the webhook; Ok when it allows the write or cannot be asked and fails open.
    pub async fn admit(&self, attempt: &Attempt<'_>) -> Result<(), ApiError> {
        let uid = uuid::Uuid::new_v4().to_string();
        match self.call(&review(attempt, &uid)).await {
            Ok(answer) => self.verdict(attempt, &uid, &answer),
            Err(_) if self.ignore_failures => Ok(()),
            Err(why) => Err(ApiError::internal(format!(
                "Internal error occurred: failed calling webhook \"{}\": {why}",
                self.name
            ))),
        }
    }

    async fn call(&self, review: &Value) -> Result<Value, String> {
        let url = self
            .url
            .as_deref()
            .ok_or("the emulator calls clientConfig.url only")?;
        let mut client = reqwest::Client::builder().timeout(self.timeout);
        if let Some(bundle) = &self.ca_bundle {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(bundle)
                .map_err(|e| format!("caBundle is not base64: {e}"))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("caBundle holds no PEM certificate: {e}"))?;
            client = client.tls_certs_only(roots);
        }
        let client = client.build().map_err(|e| format!("HTTP client: {e}"))?;
        let response = client
            .post(url)
            .json(review)
            .send()
            .await
            .map_err(|e| format!("failed to call webhook: Post \"{url}\": {e}"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("failed to call webhook: Post \"{url}\": {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "failed to call webhook: the server responded with status {status}"
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("received invalid webhook response: {e}"))
    }

    /// kube-apiserver's reading of an answer: the uid must match; a denial is a Status
    /// with the webhook's code (403 when it gives none) and its message, prefixed.
    fn verdict(&self, attempt: &Attempt<'_>, uid: &str, answer: &Value) -> Result<(), ApiError> {
        let invalid = |why: &str| {
            Err(ApiError::internal(format!(
                "Internal error occurred: failed calling webhook \"{}\": received invalid webhook response: {why}",
                self.name
            )))
        };
        let Some(response) = answer.get("response") else {
            return if self.ignore_failures {
                Ok(())
            } else {
                invalid("response is missing")
            };
        };
        if response.get("uid").and_then(Value::as_str) != Some(uid) {
            return if self.ignore_failures {
                Ok(())
            } else {
                invalid(&format!("expected response.uid=\"{uid}\""))
            };
        }
        if response.get("allowed").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        Err(denial(&self.name, attempt, response.get("status")))
    }
}

/// The error a denial becomes (`ToStatusErr` in kube-apiserver).
fn denial(webhook: &str, attempt: &Attempt<'_>, status: Option<&Value>) -> ApiError {
    let field = |name: &str| {
        status
            .and_then(|s| s.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let code = status
        .and_then(|s| s.get("code"))
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| *c != 0)
        .unwrap_or(403);
    let denied_by = format!("admission webhook \"{webhook}\" denied the request");
    let why = match (field("message"), field("reason")) {
        (Some(message), _) | (None, Some(message)) => format!("{denied_by}: {message}"),
        (None, None) => format!("{denied_by} without explanation"),
    };
    let prefix = if code == 500 {
        "Internal error occurred".to_owned()
    } else {
        format!(
            "{} \"{}\" is forbidden",
            group_resource(&attempt.rt.group, &attempt.rt.plural),
            attempt.name()
        )
    };
    let mut error = ApiError::with_code(code, format!("{prefix}: {why}"));
    // The webhook's own details (the causes kubectl prints) are kept as they are.
    error.details = match status.and_then(|s| s.get("details")) {
        Some(details) if details.is_object() => Some(details.clone()),
        _ if code == 500 => Some(json!({"causes": [{"message": error.message}]})),
        _ => Some(json!({
            "name": attempt.name(),
            "group": attempt.rt.group,
            "kind": attempt.rt.plural,
        })),
    };
    error
}

fn review(attempt: &Attempt<'_>, uid: &str) -> Value {
    let rt = attempt.rt;
    let kind = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let resource = json!({"group": rt.group, "version": rt.version, "resource": rt.plural});
    let options_kind = if attempt.create {
        "CreateOptions"
    } else {
        "UpdateOptions"
    };
    let mut request = json!({
        "uid": uid,
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": attempt.name(),
        "operation": attempt.operation(),
        "userInfo": {"username": attempt.user.unwrap_or("system:anonymous")},
        "object": attempt.object,
        "oldObject": attempt.old_object,
        "dryRun": attempt.dry_run,
        "options": {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"},
    });
    if rt.namespaced {
        request["namespace"] = json!(attempt.namespace);
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": request,
    })
}
