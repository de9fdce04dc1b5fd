//! The `MailboxPoll` custom resource: the public contract users write in YAML.
//!
//! Validation that a schema can express lives here as OpenAPI bounds and CEL rules, so
//! `kubectl apply` rejects a bad spec before the operator ever sees it. Everything a schema
//! cannot know (a missing Secret, wrong credentials) is reported later as a condition.

// `printcolumn(type_ = ..)` repeats per column by design of kube's derive.
#![allow(clippy::duplicated_attributes)]

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::delivery::content::{
    AttachmentMode, DEFAULT_MAX_ATTACHMENT_BYTES, DEFAULT_MAX_MESSAGE_BYTES, Format,
};

/// Annotation whose every new value forces exactly one poll.
pub const POLL_REQUESTED_AT_ANNOTATION: &str = "mailpoll.dev/poll-requested-at";

/// Bounds on `spec.interval`, mirrored by the CRD's CEL rule.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// A mailbox folder polled on a schedule, each message recorded once and delivered once.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailpoll.dev",
    version = "v1alpha1",
    kind = "MailboxPoll",
    plural = "mailboxpolls",
    singular = "mailboxpoll",
    shortname = "mbp",
    category = "mailpoll",
    namespaced,
    status = "MailboxPollStatus",
    derive = "PartialEq",
    doc = "MailboxPoll declares a Microsoft 365 mailbox folder that mailpoll polls through Microsoft Graph, recording every message once and delivering it once.",
    printcolumn(name = "Mailbox", type_ = "string", json_path = ".spec.mailbox"),
    printcolumn(name = "Interval", type_ = "string", json_path = ".spec.interval"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Last Poll", type_ = "date", json_path = ".status.lastPollTime"),
    printcolumn(
        name = "Delivered",
        type_ = "integer",
        json_path = ".status.messagesDelivered"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Folder",
        type_ = "string",
        json_path = ".spec.folder",
        priority = 1
    ),
    printcolumn(
        name = "Next Poll",
        type_ = "date",
        json_path = ".status.nextPollTime",
        priority = 1
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.messagesPending",
        priority = 1
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.messagesFailed",
        priority = 1
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.credentialsSecretRef) || has(self.certificate) || has(self.workloadIdentity)").message("spec needs credentials: set one of spec.credentialsSecretRef (client secret), spec.certificate or spec.workloadIdentity"))]
#[x_kube(validation = Rule::new("(has(self.credentialsSecretRef) ? 1 : 0) + (has(self.certificate) ? 1 : 0) + (has(self.workloadIdentity) ? 1 : 0) <= 1").message("spec.credentialsSecretRef, spec.certificate and spec.workloadIdentity are alternatives: set exactly one"))]
pub struct MailboxPollSpec {
    /// User principal name (ops@contoso.com) or object id of the mailbox.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.mailbox must not be empty"))]
    #[x_kube(validation = Rule::new("self.size() <= 320").message("spec.mailbox must be at most 320 characters"))]
    #[schemars(length(max = 320))]
    pub mailbox: String,

    /// Well-known folder name (inbox, archive, ...) or a folder id.
    #[serde(default = "default_folder")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.folder must not be empty"))]
    #[schemars(length(max = 512))]
    pub folder: String,

    /// Time between scheduled polls, such as 30s, 5m or 1h30m; from 10s to 24h.
    #[serde(default = "default_interval")]
    #[x_kube(validation = Rule::new("self != '' && self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$')").message("spec.interval must be a duration such as 30s, 5m or 1h30m (units h, m, s)"))]
    #[x_kube(validation = Rule::new("self == '' || !self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$') || (duration(self) >= duration('10s') && duration(self) <= duration('24h'))").message("spec.interval must be between 10s and 24h"))]
    #[schemars(length(max = 32))]
    pub interval: String,

    /// Client-secret credentials: a Secret in this namespace with the app registration's tenant id, client id and client secret. Exactly one of credentialsSecretRef, certificate and workloadIdentity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,

    /// Certificate credentials: the app registration's certificate and private key (PEM) in a Secret of this namespace, sent as a signed client assertion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateCredentials>,

    /// Azure workload identity federation: the operator's projected service account token (AZURE_FEDERATED_TOKEN_FILE) is exchanged for a token of this app registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,

    /// Where each message goes once recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,

    /// Mailbox changes made after a message is delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_delivery: Option<AfterDelivery>,

    /// Where delivery starts: all (default: every message of the folder, however old), now (messages received from the moment the operator first saw this MailboxPoll with startFrom now; that instant is kept and never moves) or an RFC 3339 time such as 2026-12-01T00:00:00Z. Older messages are recorded as skipped and never delivered or acted on, not even after a resync. Changing it affects only messages not recorded yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 'all' || self == 'now' || self.matches('^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$')").message("spec.startFrom must be all, now or an RFC 3339 time such as 2026-12-01T00:00:00Z"))]
    #[schemars(length(max = 64))]
    pub start_from: Option<String>,

    /// A CEL expression over the message, true to deliver it, such as message.from.address.endsWith("@contoso.com") && message.hasAttachments. Variables: message.id, subject, bodyPreview, importance (low, normal, high), isRead, hasAttachments, categories, from and sender ({address, name}), toRecipients, ccRecipients and replyTo (lists of {address, name}), receivedDateTime and sentDateTime (timestamps), internetMessageId, conversationId. Addresses are lower-case. Messages it rejects are recorded as filtered, never delivered or acted on. Checked at apply time by the operator's admission webhook, and by the operator before any poll (condition InvalidFilter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.trim().size() > 0").message("spec.filter must not be empty when set (leave it out to deliver every message)"))]
    #[schemars(length(max = 4096))]
    pub filter: Option<String>,

    /// Stop scheduled polls; a poll forced with the poll-requested-at annotation still runs.
    #[serde(default)]
    pub suspend: bool,

    /// Attempts a poll or delivery task gets before it is kept as dead.
    #[serde(default = "default_max_attempts")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("spec.maxAttempts must be between 1 and 100"))]
    pub max_attempts: i32,

    /// What happens to the ledger when this MailboxPoll is deleted. Retain (default): its ledger, poll history and identity stay (until retention purges them), so re-creating the same namespace/name/mailbox/folder continues it and delivers nothing twice. Delete: they are purged once the MailboxPoll is gone; a re-created one starts over and delivers every message in its folder again.
    #[serde(default)]
    pub deletion_policy: crate::identity::DeletionPolicy,

    /// Microsoft Graph change notifications as wake-ups: a new message in the folder starts a poll within seconds, and the interval stays as the safety net for notifications Graph loses. Needs the operator's public notification URL (Helm value notifications.publicUrl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<Notifications>,
}

/// Change notifications of a MailboxPoll.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Notifications {
    /// Keep a Graph subscription to the folder's new messages and poll when one arrives (default false).
    #[serde(default)]
    pub enabled: bool,
}

/// Reference to the Secret holding the Microsoft Entra app credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the MailboxPoll's namespace.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.credentialsSecretRef.name must not be empty"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key holding the directory (tenant) id.
    #[serde(default = "default_tenant_id_key")]
    #[schemars(length(max = 253))]
    pub tenant_id_key: String,
    /// Key holding the application (client) id.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(max = 253))]
    pub client_id_key: String,
    /// Key holding the client secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(max = 253))]
    pub client_secret_key: String,
}

/// An app registration's certificate credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateCredentials {
    /// Directory (tenant) id; when unset, read from the Secret's tenantId key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.certificate.tenantId must not be empty when set"))]
    #[schemars(length(max = 253))]
    pub tenant_id: Option<String>,
    /// Application (client) id; when unset, read from the Secret's clientId key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.certificate.clientId must not be empty when set"))]
    #[schemars(length(max = 253))]
    pub client_id: Option<String>,
    /// The Secret with the certificate and its private key (a kubernetes.io/tls Secret fits).
    pub secret_ref: CertificateSecretRef,
}

/// Reference to the Secret holding a certificate and its private key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSecretRef {
    /// Name of the Secret, in the MailboxPoll's namespace.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.certificate.secretRef.name must not be empty"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key holding the PEM certificate (the first certificate is the app's; a chain may follow).
    #[serde(default = "default_certificate_key")]
    #[schemars(length(max = 253))]
    pub certificate_key: String,
    /// Key holding the unencrypted PEM private key (PKCS#8 or PKCS#1 RSA); may be the same key as the certificate.
    #[serde(default = "default_private_key_key")]
    #[schemars(length(max = 253))]
    pub private_key_key: String,
    /// Key holding the tenant id, when spec.certificate.tenantId is unset.
    #[serde(default = "default_tenant_id_key")]
    #[schemars(length(max = 253))]
    pub tenant_id_key: String,
    /// Key holding the client id, when spec.certificate.clientId is unset.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(max = 253))]
    pub client_id_key: String,
}

/// Azure workload identity: the operator pod's federated service account token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// Application (client) id whose federated credential trusts the operator's service account; default AZURE_CLIENT_ID of the operator pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.workloadIdentity.clientId must not be empty when set"))]
    #[schemars(length(max = 253))]
    pub client_id: Option<String>,
    /// Directory (tenant) id; default AZURE_TENANT_ID of the operator pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.workloadIdentity.tenantId must not be empty when set"))]
    #[schemars(length(max = 253))]
    pub tenant_id: Option<String>,
}

/// Delivery targets for recorded messages.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// POST each message as JSON to this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    /// Include the message body in the ledger and the webhook payload.
    #[serde(default)]
    pub include_body: bool,
    /// Deliveries of this MailboxPoll running at once across all replicas (default: the operator's --max-concurrent-deliveries, 8 unless set). A receiver that answers slowly then holds at most this many worker slots, and other MailboxPolls' deliveries go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("spec.delivery.maxConcurrent must be between 1 and 1000"))]
    pub max_concurrent: Option<i32>,
}

/// A webhook receiving one signed POST per message.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.url) ? 1 : 0) + (has(self.urlSecretRef) ? 1 : 0) == 1").message("spec.delivery.webhook needs exactly one of url and urlSecretRef (use urlSecretRef when the URL carries a credential, such as a Logic Apps sig= parameter)"))]
#[x_kube(validation = Rule::new("!has(self.format) || self.format != 'mime' || !has(self.attachments) || self.attachments == 'none'").message("spec.delivery.webhook.attachments must be none with format mime: the raw message carries its attachments itself"))]
pub struct Webhook {
    /// https:// endpoint; http:// only for loopback or in-cluster service hosts (*.svc, *.svc.cluster.local). Exactly one of url and urlSecretRef. A URL that carries a credential (a sig= or code= parameter, a key) belongs in urlSecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https://[^/?#@]+') || self.matches('^http://(localhost|127\\\\.[0-9]+\\\\.[0-9]+\\\\.[0-9]+|\\\\[::1\\\\]|[A-Za-z0-9.-]+\\\\.svc|[A-Za-z0-9.-]+\\\\.svc\\\\.cluster\\\\.local)(:[0-9]+)?([/?#].*)?$')").message("spec.delivery.webhook.url must be an https:// URL, or http:// only for loopback or in-cluster service hosts (*.svc, *.svc.cluster.local)"))]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// The whole URL from a key of a Secret in this namespace (default key: url), for URLs that carry a credential. Checked by the same rules as url when a delivery runs; never logged or shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<UrlSecretRef>,
    /// A Secret in this namespace whose every key is an extra request header and its value the header value (for example Authorization or x-api-key). Never logged or shown. Headers mailpoll sets itself (content-type, webhook-*, idempotency-key, mailpoll-*, hop-by-hop headers) cannot be replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<SecretRef>,
    /// Standard Webhooks signing secret (whsec_ followed by base64 of 24 to 64 random bytes, as `openssl rand -base64 32` prints with whsec_ in front; the prefix is optional). Each request is signed in the webhook-signature header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<SecretKeyRef>,
    /// Time allowed for one request, such as 10s.
    #[serde(default = "default_webhook_timeout")]
    #[x_kube(validation = Rule::new("self != '' && self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$')").message("spec.delivery.webhook.timeout must be a duration such as 10s"))]
    #[x_kube(validation = Rule::new("self == '' || !self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$') || (duration(self) >= duration('1s') && duration(self) <= duration('5m'))").message("spec.delivery.webhook.timeout must be between 1s and 5m"))]
    #[schemars(length(max = 32))]
    pub timeout: String,
    /// The request body: json (the message as JSON, the default), cloudevents (the same JSON as a CloudEvents 1.0 event in HTTP binary mode, ce-id being the idempotency key), or mime (the raw RFC 5322 message as Microsoft Graph has it, content-type message/rfc822, at most maxMessageBytes).
    #[serde(default)]
    pub format: Format,
    /// Attachments in the JSON payload: none (the default), metadata (name, content type, size, inline image marks), or inline (also the content, base64, within maxAttachmentBytes and maxMessageBytes; larger ones as metadata with contentOmitted). Each listing and content fetch is a Graph request of the mailbox. Must be none with format mime.
    #[serde(default)]
    pub attachments: AttachmentMode,
    /// Largest attachment, in bytes, whose content is put in the payload (default 10 MiB, at most 50 MiB); maxMessageBytes bounds each one too.
    #[serde(default = "default_max_attachment_bytes")]
    #[schemars(range(min = 1, max = 52_428_800))]
    pub max_attachment_bytes: i64,
    /// Most bytes per message: the attachment content put in one payload, or the raw MIME of format mime (default 25 MiB, at most 50 MiB).
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1, max = 52_428_800))]
    pub max_message_bytes: i64,
}

/// The key of a Secret in the MailboxPoll's namespace that holds the webhook URL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlSecretRef {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.delivery.webhook.urlSecretRef.name must not be empty"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_url_secret_key")]
    #[schemars(length(max = 253))]
    pub key: String,
}

/// A whole Secret in the MailboxPoll's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new("self.size() > 0").message("secret reference name must not be empty"))]
    #[schemars(length(max = 253))]
    pub name: String,
}

/// A key in a Secret of the MailboxPoll's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new("self.size() > 0").message("secret reference name must not be empty"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_signing_secret_key")]
    #[schemars(length(max = 253))]
    pub key: String,
}

/// Changes made to a message in the mailbox after it was delivered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AfterDelivery {
    /// Mark the message as read (needs Mail.ReadWrite).
    #[serde(default)]
    pub mark_as_read: bool,
    /// Move the message to this folder (well-known name or id; needs Mail.ReadWrite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.afterDelivery.moveToFolder must not be empty when set"))]
    #[schemars(length(max = 512))]
    pub move_to_folder: Option<String>,
}

/// What the operator observed and did; written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MailboxPollStatus {
    /// Generation of the spec the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (mail is being picked up: True, False with the reason to fix, or Unknown until the first poll), Degraded (passing trouble such as throttling, or after-delivery actions parked with their reason) and Stalled (True while progress waits for a person); keyed by type so each writer owns its own conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// When the last poll finished, successful or not (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,
    /// When the last successful poll finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_poll_time: Option<Time>,
    /// When the next scheduled poll is due (RFC 3339); absent while suspended or while the configuration is broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll_time: Option<Time>,
    /// Messages newly recorded by the last poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_messages: Option<i64>,
    /// Messages of the ledger with every configured step done: the webhook answered 2xx (when there is one) and the after-delivery actions are done (when there are any). A message whose webhook succeeded but whose actions are still due is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_delivered: Option<i64>,
    /// Messages recorded with a step still to do (the webhook, or the after-delivery actions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_pending: Option<i64>,
    /// Messages given up on: the receiver refused them, they ran out of attempts, or their after-delivery actions were parked. `mailpoll tasks list --state dead` and `mailpoll messages list --state failed` show them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_failed: Option<i64>,
    /// Messages spec.filter rejected: recorded, never delivered or acted on (`mailpoll messages list --state filtered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_filtered: Option<i64>,
    /// Messages received before spec.startFrom: recorded as skipped, never delivered or acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_skipped: Option<i64>,
    /// The last `mailpoll.dev/poll-requested-at` value that caused a poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_poll_request: Option<String>,
    /// The Graph change-notification subscription, while spec.notifications.enabled is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<NotificationsStatus>,
}

/// The Graph subscription behind spec.notifications.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NotificationsStatus {
    /// Graph's subscription id; absent while none could be created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// When Graph drops the subscription unless renewed (the operator renews it well before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Time>,
    /// When the last notification from Graph arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_notification_time: Option<Time>,
}

fn default_folder() -> String {
    "inbox".into()
}
fn default_interval() -> String {
    "5m".into()
}
fn default_max_attempts() -> i32 {
    8
}
fn default_tenant_id_key() -> String {
    "tenantId".into()
}
fn default_client_id_key() -> String {
    "clientId".into()
}
fn default_client_secret_key() -> String {
    "clientSecret".into()
}
fn default_certificate_key() -> String {
    "tls.crt".into()
}
fn default_private_key_key() -> String {
    "tls.key".into()
}
fn default_signing_secret_key() -> String {
    "signingSecret".into()
}
fn default_url_secret_key() -> String {
    "url".into()
}
fn default_webhook_timeout() -> String {
    "10s".into()
}
// Signed in the schema (Kubernetes knows int64, not uint64); the bounds keep them positive.
fn default_max_attachment_bytes() -> i64 {
    DEFAULT_MAX_ATTACHMENT_BYTES as i64
}
fn default_max_message_bytes() -> i64 {
    DEFAULT_MAX_MESSAGE_BYTES as i64
}

/// A duration string outside the grammar the CRD accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a duration such as 30s, 5m or 1h30m")]
pub struct InvalidDuration {
    pub input: String,
}

/// Parses the duration grammar of `spec.interval` (`1h30m`, `90s`, ...): hours, minutes and
/// seconds, each at most once and in that order, as the CRD's CEL rule allows.
pub fn parse_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration {
        input: input.to_owned(),
    };
    if input.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut last_rank = 0;
    for ch in input.chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let (rank, unit_secs) = match ch {
            'h' => (1, 3600),
            'm' => (2, 60),
            's' => (3, 1),
            _ => return Err(invalid()),
        };
        if digits.is_empty() || rank <= last_rank {
            return Err(invalid());
        }
        let value: u64 = digits.parse().map_err(|_| invalid())?;
        total = value
            .checked_mul(unit_secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(invalid)?;
        digits.clear();
        last_rank = rank;
    }
    if !digits.is_empty() {
        return Err(invalid());
    }
    Ok(Duration::from_secs(total))
}

impl MailboxPollSpec {
    /// Whether change notifications are on.
    pub fn notifications_enabled(&self) -> bool {
        self.notifications.as_ref().is_some_and(|n| n.enabled)
    }

    /// The polling interval, clamped to the bounds the CRD enforces (an object stored before a
    /// schema change could carry anything).
    pub fn interval(&self) -> Result<Duration, InvalidDuration> {
        parse_duration(&self.interval).map(|d| d.clamp(MIN_INTERVAL, MAX_INTERVAL))
    }
}

/// The CustomResourceDefinition as YAML, exactly as committed in `crds/mailboxpoll.yaml`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let body = serde_saphyr::to_string(&MailboxPoll::crd())?;
    Ok(format!(
        "# Generated by `mailpoll crd`; do not edit by hand.\n---\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_the_crd_grammar() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for bad in [
            "",
            "5",
            "2d",
            "often",
            "m5",
            "5m1h",
            "1h1h",
            "-5s",
            "5 s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn interval_is_clamped_to_crd_bounds() {
        let mut spec: MailboxPollSpec = serde_json::from_value(serde_json::json!({
            "mailbox": "ops@contoso.com",
            "credentialsSecretRef": {"name": "graph"}
        }))
        .expect("minimal spec deserializes");
        assert_eq!(spec.interval(), Ok(Duration::from_secs(300)));
        assert_eq!(spec.folder, "inbox");
        assert_eq!(spec.max_attempts, 8);
        spec.interval = "1s".into();
        assert_eq!(spec.interval(), Ok(MIN_INTERVAL));
        spec.interval = "48h".into();
        assert_eq!(spec.interval(), Ok(MAX_INTERVAL));
    }

    /// The duration grammar of the CEL rules: a strict subset of Go's `time.ParseDuration`, so
    /// the API server's `duration()` accepts whatever the pattern lets through.
    const DURATION_PATTERN: &str = "^([0-9]+h)?([0-9]+m)?([0-9]+s)?$";

    #[test]
    fn cel_duration_pattern_matches_rust_parser() {
        // The CEL rule text embeds the same pattern; keep them from drifting apart.
        let crd = serde_json::to_string(&MailboxPoll::crd()).expect("crd serializes");
        assert!(crd.contains(&DURATION_PATTERN.replace('\\', "\\\\")));
    }
}
