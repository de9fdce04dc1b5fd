//! The emulated tenant: app registrations, issued tokens, mailboxes with folders and messages,
//! and the delta state of each folder. Pure data and rules without I/O: the HTTP layer locks
//! it, asks, and renders. Every random choice comes from one seeded generator, so a given seed
//! and the same sequence of calls produce the same ids, tokens and replays.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::assertion::{self, FederatedCredential, RegisteredKey};
use super::attachments::{
    MimeParts, NewAttachment, StoredAttachment, compose_mime, encoded_word, raw_value,
    render as render_attachment,
};
use super::query::{Clause, Literal, OrderKey, check_filter_order};

/// Well-known folder names and their display names; every mailbox has them all.
pub const WELL_KNOWN_FOLDERS: &[(&str, &str)] = &[
    ("inbox", "Inbox"),
    ("archive", "Archive"),
    ("deleteditems", "Deleted Items"),
    ("junkemail", "Junk Email"),
    ("sentitems", "Sent Items"),
    ("drafts", "Drafts"),
];

/// Delta rounds with a `$filter` return at most this many messages, as Graph does (the
/// default of the `filtered_delta_cap` switch).
pub const FILTERED_DELTA_CAP: usize = 5000;

/// A Graph error in the making: status, code, message, and for 410 the `Location`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub location: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_string(),
            message: message.into(),
            location: None,
            retry_after: None,
        }
    }

    pub fn item_not_found() -> Self {
        Self::new(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        )
    }
}

/// An app registration of a tenant: what the token endpoint checks and the roles it grants.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppRegistration {
    pub tenant: String,
    pub client_id: String,
    pub client_secret: String,
    /// Application roles put into tokens, e.g. `Mail.Read`, `Mail.ReadWrite`.
    pub roles: Vec<String>,
    /// PEM certificates whose keys may sign client assertions (Certificates & secrets).
    #[serde(default)]
    pub certificates: Vec<String>,
    /// Federated identity credentials (workload identity).
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredential>,
}

/// What an access token grants.
#[derive(Clone, Debug)]
pub struct TokenGrant {
    pub client_id: String,
    /// What proved the client: `secret`, `certificate:<x5t#S256>` or `federated:<subject>`.
    pub credential: String,
    /// The `jti` of the client assertion, when one proved the client.
    pub assertion_id: Option<String>,
    pub roles: Vec<String>,
    pub expires_at: Instant,
}

impl TokenGrant {
    pub fn can_read(&self) -> bool {
        self.roles
            .iter()
            .any(|role| role == "Mail.Read" || role == "Mail.ReadWrite")
    }
    pub fn can_write(&self) -> bool {
        self.roles.iter().any(|role| role == "Mail.ReadWrite")
    }
}

/// What the token endpoint needs besides the form to check a client assertion.
#[derive(Clone, Debug)]
pub struct ProofCheck {
    /// The token endpoint URL, the audience a certificate assertion must name.
    pub endpoint: String,
    pub unix_now: u64,
    /// Refuse every certificate assertion as signed by an unregistered certificate.
    pub wrong_certificate: bool,
}

/// The token endpoint's verdict on a bad request: an OAuth error body, always 400.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenError {
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

/// How a mailbox answers, whatever the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MailboxState {
    #[default]
    Enabled,
    /// 404 `MailboxNotEnabledForRESTAPI`, alternating with `ResourceNotFound` as Graph does.
    NotEnabledForRest,
    /// 403 `ErrorAccessDenied`: outside the app's application access policy.
    AccessDenied,
}

/// How an evicted or unknown delta/skip token is answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EvictionResponse {
    /// 410 Gone with a `Location` header pointing at a fresh initial delta query.
    #[default]
    Gone,
    /// 400 with code `syncStateNotFound`.
    SyncStateNotFound,
    /// 400 with code `resyncRequired`.
    ResyncRequired,
}

/// A message to add. Unset fields get deterministic defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NewMessage {
    pub subject: Option<String>,
    /// Sender address; also the display name's default (its local part).
    pub from: Option<String>,
    /// Display name of the sender, any text (control characters included).
    pub from_name: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub received: Option<DateTime<Utc>>,
    pub body: Option<String>,
    pub body_is_html: bool,
    pub internet_message_id: Option<String>,
    pub is_read: bool,
    pub has_attachments: bool,
    pub importance: Option<String>,
    /// Outlook categories (Graph sends them only when `$select` names them).
    pub categories: Vec<String>,
    /// Its attachments; any that is not inline makes `hasAttachments` true.
    pub attachments: Vec<NewAttachment>,
}

/// The two ids of a message: the immutable one and the default one (changes on move).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageIds {
    pub immutable_id: String,
    pub rest_id: String,
}

#[derive(Clone, Debug)]
struct Folder {
    id: String,
    well_known: Option<&'static str>,
}

#[derive(Clone, Debug)]
struct Msg {
    ids: MessageIds,
    folder: usize,
    deleted: bool,
    internet_message_id: String,
    subject: String,
    from: String,
    from_name: Option<String>,
    to: Vec<String>,
    cc: Vec<String>,
    received: DateTime<Utc>,
    sent: DateTime<Utc>,
    is_read: bool,
    has_attachments: bool,
    importance: String,
    categories: Vec<String>,
    conversation_id: String,
    body: String,
    body_is_html: bool,
    attachments: Vec<StoredAttachment>,
    /// Mailbox version when the message entered its current folder.
    created: u64,
    /// Mailbox version of the last change.
    changed: u64,
    /// Properties changed in place and the mailbox version of their last change, for delta
    /// items that carry only what changed.
    property_changes: Vec<(&'static str, u64)>,
    /// Delta rounds of its folder that must end before delta shows it (late arrival).
    hidden_rounds: u32,
    /// The delta item as last served. Paging a large folder would otherwise build and
    /// serialize every message again on each round, which made the emulator a large share of
    /// any benchmark that reads through it.
    rendered: Option<RenderedItem>,
}

impl Msg {
    /// Notes an in-place change of `property` at mailbox version `version`.
    fn record_change(&mut self, property: &'static str, version: u64) {
        match self
            .property_changes
            .iter_mut()
            .find(|(name, _)| *name == property)
        {
            Some(entry) => entry.1 = version,
            None => self.property_changes.push((property, version)),
        }
    }

    /// The properties changed after `since`, when in-place changes are all that happened to
    /// the message since then (not new to the folder, not a late arrival made visible).
    fn changed_properties(&self, since: u64) -> Option<Vec<&'static str>> {
        let last_property_change = self.property_changes.iter().map(|(_, at)| *at).max()?;
        if self.created > since || last_property_change != self.changed {
            return None;
        }
        Some(
            self.property_changes
                .iter()
                .filter(|(_, at)| *at > since)
                .map(|(name, _)| *name)
                .collect(),
        )
    }
}

/// A delta item's JSON text and what it was rendered for: any difference renders anew.
#[derive(Clone, Debug)]
struct RenderedItem {
    select: Option<Vec<String>>,
    immutable_ids: bool,
    /// `Msg::changed` at rendering time: every change to a message bumps it.
    changed: u64,
    folder: usize,
    text: Arc<str>,
}

#[derive(Clone, Debug)]
struct Tombstone {
    folder: usize,
    ids: MessageIds,
    version: u64,
    reason: &'static str,
}

#[derive(Clone, Debug)]
enum RoundItem {
    Message(usize),
    Removed {
        ids: MessageIds,
        reason: &'static str,
    },
}

/// One delta round being paged: its items are fixed when the round starts.
#[derive(Debug)]
struct Round {
    folder: usize,
    /// The version the round's cursor stood at: changes after it are what the round reports.
    since: u64,
    items: Vec<RoundItem>,
    end_version: u64,
    filter: Option<Clause>,
    select: Option<Vec<String>>,
}

/// What a delta token remembers: where the next round starts.
#[derive(Clone, Debug)]
struct DeltaCursor {
    folder: usize,
    version: u64,
    filter: Option<Clause>,
    select: Option<Vec<String>>,
    last_page: Vec<usize>,
}

#[derive(Debug)]
pub struct Mailbox {
    pub upn: String,
    pub object_id: String,
    pub state: MailboxState,
    not_found_flip: bool,
    folders: Vec<Folder>,
    messages: Vec<Msg>,
    by_immutable: HashMap<String, usize>,
    by_rest: HashMap<String, usize>,
    version: u64,
    tombstones: Vec<Tombstone>,
    rounds: Vec<Option<Round>>,
    skip_tokens: HashMap<String, (usize, usize)>,
    delta_tokens: HashMap<String, DeltaCursor>,
}

/// Options of a delta request, parsed by the HTTP layer.
#[derive(Clone, Debug, Default)]
pub struct DeltaQuery {
    pub select: Option<Vec<String>>,
    pub filter: Option<Clause>,
    pub skip_token: Option<String>,
    pub delta_token: Option<String>,
    pub page_size: usize,
    pub change_type: Option<String>,
}

/// Behaviours of delta that tests switch on.
#[derive(Clone, Copy, Debug)]
pub struct DeltaBehaviour {
    pub replay_ratio: f64,
    pub eviction: EvictionResponse,
    /// Most messages of a round whose cursor carries a `$filter`.
    pub filtered_cap: usize,
    /// Updated messages are served with only `id` and their changed properties.
    pub partial_updates: bool,
}

impl Default for DeltaBehaviour {
    fn default() -> Self {
        Self {
            replay_ratio: 0.0,
            eviction: EvictionResponse::default(),
            filtered_cap: FILTERED_DELTA_CAP,
            partial_updates: false,
        }
    }
}

/// A delta page: rendered items (each one JSON object's text) and the link that follows.
#[derive(Debug)]
pub struct DeltaPage {
    pub items: Vec<Arc<str>>,
    /// `Ok(token)` is a skip token (more pages), `Err(token)` a delta token (round done).
    pub next: Result<String, String>,
}

/// Options of a list request.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub select: Option<Vec<String>>,
    pub filter: Vec<Clause>,
    pub order: Vec<OrderKey>,
    pub top: usize,
    pub skip: usize,
}

/// A list page: rendered items and the `$skip` of the next page, if any.
#[derive(Debug)]
pub struct ListPage {
    pub items: Vec<Value>,
    pub next_skip: Option<usize>,
}

/// The whole emulated tenant.
pub struct World {
    rng: StdRng,
    clock: DateTime<Utc>,
    apps: Vec<AppRegistration>,
    tokens: HashMap<String, TokenGrant>,
    /// Signing keys (PKCS#1) of trusted OIDC issuers, by issuer URL.
    issuers: HashMap<String, Vec<u8>>,
    mailboxes: Vec<Mailbox>,
    /// Mailbox positions by lower-case UPN and object id (mailboxes are never removed).
    mailbox_keys: HashMap<String, usize>,
}

const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

impl World {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            // Messages are received on a virtual clock, so dates are the same on every run.
            clock: Utc
                .with_ymd_and_hms(2025, 3, 4, 8, 0, 0)
                .single()
                .unwrap_or_default(),
            apps: Vec::new(),
            tokens: HashMap::new(),
            issuers: HashMap::new(),
            mailboxes: Vec::new(),
            mailbox_keys: HashMap::new(),
        }
    }

    fn random_text(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| ID_ALPHABET[self.rng.random_range(0..ID_ALPHABET.len())] as char)
            .collect()
    }

    /// A random value in [0, 1) from the world's generator.
    pub fn random_unit(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// A request id in GUID form, from the world's generator.
    pub fn request_id(&mut self) -> String {
        uuid::Uuid::from_u128(self.rng.random::<u128>()).to_string()
    }

    // ------------------------------------------------------------------ apps and tokens

    pub fn add_app(&mut self, app: AppRegistration) {
        self.apps
            .retain(|known| !(known.tenant == app.tenant && known.client_id == app.client_id));
        self.apps.push(app);
    }

    /// The client-credentials grant, with Entra's checks and error codes.
    pub fn issue_token(
        &mut self,
        form: &HashMap<String, String>,
        tenant: &str,
        lifetime: Duration,
        now: Instant,
        proof: &ProofCheck,
    ) -> Result<(String, TokenGrant), TokenError> {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if field("grant_type") != "client_credentials" {
            return Err(TokenError {
                error: "unsupported_grant_type",
                code: 70003,
                description: "AADSTS70003: The app requested an unsupported grant type.".into(),
            });
        }
        if !field("scope").ends_with("/.default") {
            return Err(TokenError {
                error: "invalid_scope",
                code: 1002012,
                description:
                    "AADSTS1002012: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier."
                        .into(),
            });
        }
        if !self.apps.iter().any(|app| app.tenant == tenant) {
            return Err(TokenError {
                error: "invalid_request",
                code: 90002,
                description: format!("AADSTS90002: Tenant '{tenant}' not found."),
            });
        }
        let client_id = field("client_id");
        let Some(app) = self
            .apps
            .iter()
            .find(|app| app.tenant == tenant && app.client_id == client_id)
            .cloned()
        else {
            return Err(TokenError {
                error: "unauthorized_client",
                code: 700016,
                description: format!(
                    "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'."
                ),
            });
        };
        let credential = self.check_proof(form, &app, proof)?;
        let assertion_id = form
            .get("client_assertion")
            .and_then(|text| assertion::Jwt::parse(text).ok())
            .and_then(|jwt| jwt.claims["jti"].as_str().map(str::to_owned));
        let token = format!("eyJ0eXAiOiJKV1Qi.{}", self.random_text(48));
        let grant = TokenGrant {
            client_id: app.client_id.clone(),
            credential,
            assertion_id,
            roles: app.roles.clone(),
            expires_at: now + lifetime,
        };
        self.tokens.insert(token.clone(), grant.clone());
        Ok((token, grant))
    }

    /// Registers the signing key of an OIDC issuer (a cluster's service account issuer).
    pub fn add_issuer(&mut self, issuer: &str, public_key: Vec<u8>) {
        self.issuers.insert(issuer.to_owned(), public_key);
    }

    /// The client's proof: its secret, or a client assertion (certificate or federated
    /// token). Returns the label of the credential that matched.
    fn check_proof(
        &self,
        form: &HashMap<String, String>,
        app: &AppRegistration,
        proof: &ProofCheck,
    ) -> Result<String, TokenError> {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        let Some(assertion) = form.get("client_assertion") else {
            if field("client_secret") != app.client_secret {
                return Err(TokenError {
                    error: "invalid_client",
                    code: 7000215,
                    description: "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.".into(),
                });
            }
            return Ok("secret".into());
        };
        if field("client_assertion_type")
            != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        {
            return Err(TokenError {
                error: "invalid_request",
                code: 700022,
                description: "AADSTS700022: The provided value for the input parameter client_assertion_type is not valid.".into(),
            });
        }
        let jwt = assertion::Jwt::parse(assertion)?;
        let issuer = jwt.claims["iss"].as_str().unwrap_or_default();
        if issuer == app.client_id {
            let registered: Vec<RegisteredKey> = if proof.wrong_certificate {
                Vec::new()
            } else {
                app.certificates
                    .iter()
                    .filter_map(|pem| RegisteredKey::from_certificate_pem(pem).ok())
                    .collect()
            };
            let thumbprint = assertion::check_certificate_assertion(
                &jwt,
                &app.client_id,
                &proof.endpoint,
                &registered,
                proof.unix_now,
            )?;
            return Ok(format!("certificate:{thumbprint}"));
        }
        let subject = assertion::check_federated_token(
            &jwt,
            &app.federated_credentials,
            |issuer| self.issuers.get(issuer).cloned(),
            proof.unix_now,
        )?;
        Ok(format!("federated:{subject}"))
    }

    /// The grant behind a bearer token, when it is known and not expired.
    pub fn check_token(&self, token: &str, now: Instant) -> Option<TokenGrant> {
        self.tokens
            .get(token)
            .filter(|grant| grant.expires_at > now)
            .cloned()
    }

    /// Forgets every issued token: the next request with one gets 401.
    pub fn revoke_tokens(&mut self) {
        self.tokens.clear();
    }

    // ------------------------------------------------------------------ mailboxes

    /// Adds a mailbox with the well-known folders; returns its object id.
    pub fn add_mailbox(&mut self, upn: &str) -> String {
        if let Some(existing) = self.find_mailbox(upn) {
            return self.mailboxes[existing].object_id.clone();
        }
        let object_id = uuid::Uuid::from_u128(self.rng.random::<u128>()).to_string();
        let folders = WELL_KNOWN_FOLDERS
            .iter()
            .map(|(name, _)| Folder {
                id: format!("AAMkAGFolder{}", self.random_text(24)),
                well_known: Some(name),
            })
            .collect();
        self.mailbox_keys
            .insert(upn.to_ascii_lowercase(), self.mailboxes.len());
        self.mailbox_keys
            .insert(object_id.to_ascii_lowercase(), self.mailboxes.len());
        self.mailboxes.push(Mailbox {
            upn: upn.to_string(),
            object_id: object_id.clone(),
            state: MailboxState::Enabled,
            not_found_flip: false,
            folders,
            messages: Vec::new(),
            by_immutable: HashMap::new(),
            by_rest: HashMap::new(),
            version: 0,
            tombstones: Vec::new(),
            rounds: Vec::new(),
            skip_tokens: HashMap::new(),
            delta_tokens: HashMap::new(),
        });
        object_id
    }

    /// A mailbox by UPN (case-insensitive) or object id.
    pub fn find_mailbox(&self, key: &str) -> Option<usize> {
        self.mailbox_keys.get(&key.to_ascii_lowercase()).copied()
    }

    /// The canonical (UPN, lower-case) key counters use for a mailbox.
    pub fn mailbox_key(&self, index: usize) -> String {
        self.mailboxes[index].upn.to_ascii_lowercase()
    }

    pub fn set_mailbox_state(&mut self, mailbox: usize, state: MailboxState) {
        self.mailboxes[mailbox].state = state;
    }

    /// The error a mailbox in a bad state answers with, if any.
    pub fn mailbox_error(&mut self, mailbox: usize) -> Option<ApiError> {
        let mailbox = &mut self.mailboxes[mailbox];
        match mailbox.state {
            MailboxState::Enabled => None,
            MailboxState::AccessDenied => Some(ApiError::new(
                403,
                "ErrorAccessDenied",
                "Access to OData is disabled.",
            )),
            MailboxState::NotEnabledForRest => {
                mailbox.not_found_flip = !mailbox.not_found_flip;
                Some(if mailbox.not_found_flip {
                    ApiError::new(
                        404,
                        "MailboxNotEnabledForRESTAPI",
                        "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
                    )
                } else {
                    ApiError::new(404, "ResourceNotFound", "Resource could not be discovered.")
                })
            }
        }
    }

    /// A folder by well-known name (case-insensitive) or id.
    pub fn find_folder(&self, mailbox: usize, key: &str) -> Option<usize> {
        self.mailboxes[mailbox].folders.iter().position(|folder| {
            folder.id == key
                || folder
                    .well_known
                    .is_some_and(|name| name.eq_ignore_ascii_case(key))
        })
    }

    pub fn folder_id(&self, mailbox: usize, folder: usize) -> String {
        self.mailboxes[mailbox].folders[folder].id.clone()
    }

    // ------------------------------------------------------------------ messages

    /// Adds a message. With `late`, delta shows it only after the folder's next round ends.
    pub fn add_message(
        &mut self,
        mailbox: usize,
        folder: usize,
        new: NewMessage,
        late: bool,
    ) -> MessageIds {
        let number = self.mailboxes[mailbox].messages.len();
        // Every third message shares its second with the previous one, as real mail does.
        if number % 3 != 2 {
            self.clock += chrono::Duration::seconds(1);
        }
        let received = new.received.unwrap_or(self.clock);
        let ids = MessageIds {
            immutable_id: format!("AAkALgAAAAAAHYQDEapmEc2byACqAC-{}", self.random_text(40)),
            rest_id: format!("AAMkAGI2TG93AAA-{}", self.random_text(40)),
        };
        let conversation = format!("AAQkAGI2Conv{}", self.random_text(16));
        // Graph's hasAttachments leaves inline attachments out.
        let has_attachments = new.has_attachments
            || new
                .attachments
                .iter()
                .any(|attachment| !attachment.is_inline);
        let attachments: Vec<StoredAttachment> = new
            .attachments
            .into_iter()
            .map(|attachment| StoredAttachment {
                id: format!("AAMkAGI2Att{}", self.random_text(24)),
                attachment,
            })
            .collect();
        let domain = self.mailboxes[mailbox]
            .upn
            .split('@')
            .nth(1)
            .unwrap_or("contoso.com")
            .to_string();
        let mailbox_ref = &mut self.mailboxes[mailbox];
        mailbox_ref.version += 1;
        let version = mailbox_ref.version;
        let msg = Msg {
            ids: ids.clone(),
            folder,
            deleted: false,
            internet_message_id: new
                .internet_message_id
                .unwrap_or_else(|| format!("<msg-{number}-{}@{domain}>", version)),
            subject: new.subject.unwrap_or_else(|| format!("Message {number}")),
            from: new
                .from
                .unwrap_or_else(|| format!("sender{}@fabrikam.com", number % 7)),
            from_name: new.from_name,
            to: if new.to.is_empty() {
                vec![mailbox_ref.upn.clone()]
            } else {
                new.to
            },
            cc: new.cc,
            received,
            sent: received - chrono::Duration::seconds(2),
            is_read: new.is_read,
            has_attachments,
            importance: new.importance.unwrap_or_else(|| "normal".into()),
            categories: new.categories,
            conversation_id: conversation,
            body: new
                .body
                .unwrap_or_else(|| format!("Hello,\r\nthis is message {number}.\r\n")),
            body_is_html: new.body_is_html,
            attachments,
            created: version,
            changed: version,
            property_changes: Vec::new(),
            hidden_rounds: u32::from(late),
            rendered: None,
        };
        mailbox_ref
            .by_immutable
            .insert(ids.immutable_id.clone(), number);
        mailbox_ref.by_rest.insert(ids.rest_id.clone(), number);
        mailbox_ref.messages.push(msg);
        ids
    }

    /// A live message by immutable or default id (ids are case-sensitive).
    pub fn find_message(&self, mailbox: usize, id: &str) -> Option<usize> {
        let mailbox = &self.mailboxes[mailbox];
        mailbox
            .by_immutable
            .get(id)
            .or_else(|| mailbox.by_rest.get(id))
            .copied()
            .filter(|&index| !mailbox.messages[index].deleted)
    }

    pub fn message_ids(&self, mailbox: usize, message: usize) -> MessageIds {
        self.mailboxes[mailbox].messages[message].ids.clone()
    }

    pub fn set_read(&mut self, mailbox: usize, message: usize, is_read: bool) {
        let mailbox = &mut self.mailboxes[mailbox];
        mailbox.version += 1;
        let version = mailbox.version;
        let msg = &mut mailbox.messages[message];
        msg.is_read = is_read;
        msg.rendered = None;
        msg.changed = version;
        msg.record_change("isRead", version);
    }

    /// Every id a message was known by (immutable, current default), deleted ones included,
    /// given any of them; just `id` when no message has it.
    pub fn id_aliases(&self, mailbox: usize, id: &str) -> Vec<String> {
        let mailbox = &self.mailboxes[mailbox];
        let found = mailbox
            .by_immutable
            .get(id)
            .or_else(|| mailbox.by_rest.get(id));
        match found {
            Some(&index) => {
                let ids = &mailbox.messages[index].ids;
                vec![ids.immutable_id.clone(), ids.rest_id.clone()]
            }
            None => vec![id.to_string()],
        }
    }

    /// Moves a message: its default id changes, its immutable id stays, and delta of the old
    /// folder reports it removed.
    pub fn move_message(&mut self, mailbox: usize, message: usize, folder: usize) -> MessageIds {
        let new_rest = format!("AAMkAGI2TG93AAA-{}", self.random_text(40));
        let mailbox = &mut self.mailboxes[mailbox];
        let old_folder = mailbox.messages[message].folder;
        if old_folder == folder {
            return mailbox.messages[message].ids.clone();
        }
        mailbox.version += 1;
        let version = mailbox.version;
        let old_ids = mailbox.messages[message].ids.clone();
        mailbox.tombstones.push(Tombstone {
            folder: old_folder,
            ids: old_ids.clone(),
            version,
            reason: "changed",
        });
        mailbox.by_rest.remove(&old_ids.rest_id);
        mailbox.by_rest.insert(new_rest.clone(), message);
        let msg = &mut mailbox.messages[message];
        msg.ids.rest_id = new_rest;
        msg.folder = folder;
        msg.rendered = None;
        // For the destination's delta the message is new: it is served whole.
        msg.created = version;
        msg.changed = version;
        msg.property_changes.clear();
        msg.ids.clone()
    }

    pub fn delete_message(&mut self, mailbox: usize, message: usize) {
        let mailbox = &mut self.mailboxes[mailbox];
        mailbox.version += 1;
        let version = mailbox.version;
        let msg = &mut mailbox.messages[message];
        msg.deleted = true;
        mailbox.tombstones.push(Tombstone {
            folder: msg.folder,
            ids: msg.ids.clone(),
            version,
            reason: "deleted",
        });
    }

    /// Number of live messages in a folder.
    pub fn folder_len(&self, mailbox: usize, folder: usize) -> usize {
        self.mailboxes[mailbox]
            .messages
            .iter()
            .filter(|msg| !msg.deleted && msg.folder == folder)
            .count()
    }

    /// The message as RFC 5322 text, for `$value`: its fields as headers, its body, and its
    /// attachments as MIME parts.
    pub fn mime(&self, mailbox: usize, message: usize) -> String {
        let msg = &self.mailboxes[mailbox].messages[message];
        let mut headers = vec![
            format!("Message-ID: {}", msg.internet_message_id),
            format!("Date: {}", msg.sent.to_rfc2822()),
            match &msg.from_name {
                Some(name) => format!("From: {name} <{}>", msg.from),
                None => format!("From: {}", msg.from),
            },
            format!("To: {}", msg.to.join(", ")),
        ];
        if !msg.cc.is_empty() {
            headers.push(format!("Cc: {}", msg.cc.join(", ")));
        }
        headers.push(format!("Subject: {}", encoded_word(&msg.subject)));
        compose_mime(&MimeParts {
            headers,
            body: &msg.body,
            body_is_html: msg.body_is_html,
            attachments: &msg.attachments,
            boundary_seed: &msg.conversation_id,
        })
    }

    /// A live message's attachments, rendered for a listing.
    pub fn attachment_listing(
        &self,
        mailbox: usize,
        message: usize,
        select: Option<&[String]>,
    ) -> Vec<Value> {
        let msg = &self.mailboxes[mailbox].messages[message];
        let modified = msg.received.to_rfc3339_opts(SecondsFormat::Secs, true);
        msg.attachments
            .iter()
            .map(|stored| render_attachment(stored, &modified, select))
            .collect()
    }

    /// One attachment of a live message, rendered whole (file content included).
    pub fn attachment(
        &self,
        mailbox: usize,
        message: usize,
        attachment_id: &str,
    ) -> Result<Value, ApiError> {
        let msg = &self.mailboxes[mailbox].messages[message];
        let modified = msg.received.to_rfc3339_opts(SecondsFormat::Secs, true);
        let stored = Self::stored_attachment(msg, attachment_id)?;
        Ok(render_attachment(stored, &modified, None))
    }

    /// The raw content of one attachment of a live message and its content type.
    pub fn attachment_value(
        &self,
        mailbox: usize,
        message: usize,
        attachment_id: &str,
    ) -> Result<(Vec<u8>, String), ApiError> {
        let msg = &self.mailboxes[mailbox].messages[message];
        raw_value(Self::stored_attachment(msg, attachment_id)?)
    }

    fn stored_attachment<'a>(msg: &'a Msg, id: &str) -> Result<&'a StoredAttachment, ApiError> {
        msg.attachments
            .iter()
            .find(|stored| stored.id == id)
            .ok_or_else(ApiError::item_not_found)
    }

    /// A message as Graph renders it, restricted to `select` (plus `id`).
    pub fn render(
        &self,
        mailbox: usize,
        message: usize,
        select: Option<&[String]>,
        immutable_ids: bool,
    ) -> Value {
        const ORDER: &[&str] = &[
            "id",
            "createdDateTime",
            "lastModifiedDateTime",
            "receivedDateTime",
            "sentDateTime",
            "hasAttachments",
            "internetMessageId",
            "subject",
            "bodyPreview",
            "importance",
            "parentFolderId",
            "conversationId",
            "isRead",
            "categories",
            "webLink",
            "body",
            "sender",
            "from",
            "toRecipients",
            "ccRecipients",
            "replyTo",
        ];
        let mailbox_ref = &self.mailboxes[mailbox];
        let msg = &mailbox_ref.messages[message];
        let date = |moment: &DateTime<Utc>| moment.to_rfc3339_opts(SecondsFormat::Secs, true);
        let address = |text: &str| {
            let name = text.split('@').next().unwrap_or(text);
            json!({"emailAddress": {"name": name, "address": text}})
        };
        let sender = || match &msg.from_name {
            Some(name) => json!({"emailAddress": {"name": name, "address": msg.from}}),
            None => address(&msg.from),
        };
        let field = |name: &str| -> Value {
            match name {
                "id" if immutable_ids => json!(msg.ids.immutable_id),
                "id" => json!(msg.ids.rest_id),
                "createdDateTime" | "lastModifiedDateTime" | "receivedDateTime" => {
                    json!(date(&msg.received))
                }
                "sentDateTime" => json!(date(&msg.sent)),
                "hasAttachments" => json!(msg.has_attachments),
                "internetMessageId" => json!(msg.internet_message_id),
                "subject" => json!(msg.subject),
                "bodyPreview" => json!(msg.body.chars().take(255).collect::<String>()),
                "importance" => json!(msg.importance),
                "parentFolderId" => json!(mailbox_ref.folders[msg.folder].id),
                "conversationId" => json!(msg.conversation_id),
                "isRead" => json!(msg.is_read),
                "categories" => json!(msg.categories),
                "webLink" => json!(format!(
                    "https://outlook.office365.com/owa/?ItemID={}&exvsurl=1&viewmodel=ReadMessageItem",
                    msg.ids.rest_id
                )),
                "body" => json!({
                    "contentType": if msg.body_is_html { "html" } else { "text" },
                    "content": msg.body,
                }),
                "sender" | "from" => sender(),
                "toRecipients" => Value::Array(msg.to.iter().map(|to| address(to)).collect()),
                "ccRecipients" => Value::Array(msg.cc.iter().map(|cc| address(cc)).collect()),
                _ => json!([]),
            }
        };
        let mut object = Map::new();
        object.insert(
            "@odata.etag".into(),
            json!(format!("W/\"CQAAABYAAAB{}\"", msg.changed)),
        );
        for name in ORDER {
            let wanted = match select {
                None => true,
                Some(select) => *name == "id" || select.iter().any(|field| field == name),
            };
            if wanted {
                object.insert((*name).to_string(), field(name));
            }
        }
        Value::Object(object)
    }

    // ------------------------------------------------------------------ list

    fn property_cmp(a: &Msg, b: &Msg, property: &str) -> std::cmp::Ordering {
        match property {
            "receivedDateTime" | "createdDateTime" | "lastModifiedDateTime" => {
                a.received.cmp(&b.received)
            }
            "sentDateTime" => a.sent.cmp(&b.sent),
            "subject" => a.subject.cmp(&b.subject),
            "isRead" => a.is_read.cmp(&b.is_read),
            "hasAttachments" => a.has_attachments.cmp(&b.has_attachments),
            "importance" => a.importance.cmp(&b.importance),
            _ => std::cmp::Ordering::Equal,
        }
    }

    fn matches(msg: &Msg, clause: &Clause) -> bool {
        let ordering = match (&clause.value, clause.property.as_str()) {
            (
                Literal::DateTime(moment),
                "receivedDateTime" | "createdDateTime" | "lastModifiedDateTime",
            ) => msg.received.cmp(moment),
            (Literal::DateTime(moment), "sentDateTime") => msg.sent.cmp(moment),
            (Literal::Bool(value), "isRead") => msg.is_read.cmp(value),
            (Literal::Bool(value), "hasAttachments") => msg.has_attachments.cmp(value),
            (Literal::Text(value), "subject") => msg.subject.as_str().cmp(value.as_str()),
            (Literal::Text(value), "importance") => msg.importance.as_str().cmp(value.as_str()),
            (Literal::Text(value), "internetMessageId") => {
                msg.internet_message_id.as_str().cmp(value.as_str())
            }
            (Literal::Text(value), "conversationId") => {
                msg.conversation_id.as_str().cmp(value.as_str())
            }
            _ => return false,
        };
        clause.op.holds(ordering)
    }

    /// A page of a folder's messages, Graph's list rules applied. `skip_jump` is added to the
    /// next page's `$skip`, as Graph's own skips sometimes run ahead of the page size.
    pub fn list(
        &self,
        mailbox: usize,
        folder: usize,
        query: &ListQuery,
        immutable_ids: bool,
        skip_jump: usize,
    ) -> Result<ListPage, ApiError> {
        check_filter_order(&query.filter, &query.order)?;
        let mailbox_ref = &self.mailboxes[mailbox];
        let mut matching: Vec<usize> = mailbox_ref
            .messages
            .iter()
            .enumerate()
            .filter(|(_, msg)| !msg.deleted && msg.folder == folder)
            .filter(|(_, msg)| query.filter.iter().all(|clause| Self::matches(msg, clause)))
            .map(|(index, _)| index)
            .collect();
        let default_order = [OrderKey {
            property: "receivedDateTime".into(),
            descending: true,
        }];
        let order = if query.order.is_empty() {
            &default_order[..]
        } else {
            &query.order[..]
        };
        matching.sort_by(|&a, &b| {
            let (ma, mb) = (&mailbox_ref.messages[a], &mailbox_ref.messages[b]);
            for key in order {
                let ordering = Self::property_cmp(ma, mb, &key.property);
                let ordering = if key.descending {
                    ordering.reverse()
                } else {
                    ordering
                };
                if ordering.is_ne() {
                    return ordering;
                }
            }
            a.cmp(&b)
        });
        let items = matching
            .iter()
            .skip(query.skip)
            .take(query.top)
            .map(|&index| self.render(mailbox, index, query.select.as_deref(), immutable_ids))
            .collect();
        let end = query.skip + query.top;
        let next_skip = (end < matching.len()).then_some(end + skip_jump);
        Ok(ListPage { items, next_skip })
    }

    // ------------------------------------------------------------------ delta

    fn eviction_error(behaviour: EvictionResponse, location: String) -> ApiError {
        match behaviour {
            EvictionResponse::Gone => ApiError {
                location: Some(location),
                ..ApiError::new(
                    410,
                    "resyncRequired",
                    "The sync state generation is no longer valid. Start a new sync with a fresh initial request.",
                )
            },
            EvictionResponse::SyncStateNotFound => ApiError::new(
                400,
                "syncStateNotFound",
                "The sync state cannot be found. It may have expired.",
            ),
            EvictionResponse::ResyncRequired => ApiError::new(
                400,
                "resyncRequired",
                "A resync is required for this sync state.",
            ),
        }
    }

    /// One delta page. `initial_link` is where an evicted token's 410 points to.
    pub fn delta(
        &mut self,
        mailbox: usize,
        folder: usize,
        query: &DeltaQuery,
        behaviour: DeltaBehaviour,
        immutable_ids: bool,
        initial_link: String,
    ) -> Result<DeltaPage, ApiError> {
        let (round_index, position) = if let Some(token) = &query.skip_token {
            match self.mailboxes[mailbox].skip_tokens.get(token) {
                Some(&(round, position)) if self.mailboxes[mailbox].rounds[round].is_some() => {
                    (round, position)
                }
                _ => return Err(Self::eviction_error(behaviour.eviction, initial_link)),
            }
        } else {
            let cursor = match &query.delta_token {
                Some(token) => match self.mailboxes[mailbox].delta_tokens.get(token) {
                    Some(cursor) => cursor.clone(),
                    None => return Err(Self::eviction_error(behaviour.eviction, initial_link)),
                },
                None => DeltaCursor {
                    folder,
                    version: 0,
                    filter: query.filter.clone(),
                    select: query.select.clone(),
                    last_page: Vec::new(),
                },
            };
            let round = self.start_round(mailbox, &cursor, query, behaviour);
            let rounds = &mut self.mailboxes[mailbox].rounds;
            rounds.push(Some(round));
            (rounds.len() - 1, 0)
        };

        let mut page_numbers = Vec::new();
        let (items, end, round_len, page_select, since) = {
            let round = self.mailboxes[mailbox].rounds[round_index]
                .as_ref()
                .ok_or_else(|| Self::eviction_error(behaviour.eviction, initial_link.clone()))?;
            let end = (position + query.page_size.max(1)).min(round.items.len());
            let slice: Vec<RoundItem> = round.items[position..end].to_vec();
            (
                slice,
                end,
                round.items.len(),
                round.select.clone(),
                round.since,
            )
        };
        let mut rendered = Vec::with_capacity(items.len());
        for item in items {
            match item {
                RoundItem::Message(index) => {
                    page_numbers.push(index);
                    let partial = behaviour
                        .partial_updates
                        .then(|| {
                            self.render_partial_update(
                                mailbox,
                                index,
                                since,
                                page_select.as_deref(),
                                immutable_ids,
                            )
                        })
                        .flatten();
                    rendered.push(partial.unwrap_or_else(|| {
                        self.render_delta_item(
                            mailbox,
                            index,
                            page_select.as_deref(),
                            immutable_ids,
                        )
                    }));
                }
                RoundItem::Removed { ids, reason } => {
                    let id = if immutable_ids {
                        ids.immutable_id
                    } else {
                        ids.rest_id
                    };
                    let item = json!({
                        "@odata.type": "#microsoft.graph.message",
                        "id": id,
                        "@removed": {"reason": reason},
                    });
                    rendered.push(item.to_string().into());
                }
            }
        }
        let token = self.random_text(43);
        let mailbox_ref = &mut self.mailboxes[mailbox];
        if end < round_len {
            mailbox_ref
                .skip_tokens
                .insert(token.clone(), (round_index, end));
            return Ok(DeltaPage {
                items: rendered,
                next: Ok(token),
            });
        }
        let round = mailbox_ref.rounds[round_index]
            .as_ref()
            .ok_or_else(|| Self::eviction_error(behaviour.eviction, initial_link))?;
        let cursor = DeltaCursor {
            folder: round.folder,
            version: round.end_version,
            filter: round.filter.clone(),
            select: round.select.clone(),
            last_page: page_numbers,
        };
        let round_folder = round.folder;
        mailbox_ref.delta_tokens.insert(token.clone(), cursor);
        // Late arrivals become visible once a round of their folder has ended without them.
        let mut version = mailbox_ref.version;
        for msg in mailbox_ref
            .messages
            .iter_mut()
            .filter(|msg| msg.folder == round_folder && msg.hidden_rounds > 0)
        {
            msg.hidden_rounds -= 1;
            if msg.hidden_rounds == 0 {
                version += 1;
                msg.changed = version;
            }
        }
        mailbox_ref.version = version;
        Ok(DeltaPage {
            items: rendered,
            next: Err(token),
        })
    }

    /// A message as a delta item (`render` plus `@odata.type`), as JSON text. The text is
    /// kept and served again while the message, the selection and the id kind stay the same.
    fn render_delta_item(
        &mut self,
        mailbox: usize,
        message: usize,
        select: Option<&[String]>,
        immutable_ids: bool,
    ) -> Arc<str> {
        let msg = &self.mailboxes[mailbox].messages[message];
        if let Some(cached) = &msg.rendered
            && cached.immutable_ids == immutable_ids
            && cached.changed == msg.changed
            && cached.folder == msg.folder
            && cached.select.as_deref() == select
        {
            return cached.text.clone();
        }
        let mut value = self.render(mailbox, message, select, immutable_ids);
        if let Value::Object(object) = &mut value {
            object.insert("@odata.type".into(), json!("#microsoft.graph.message"));
        }
        let text: Arc<str> = value.to_string().into();
        let msg = &mut self.mailboxes[mailbox].messages[message];
        msg.rendered = Some(RenderedItem {
            select: select.map(<[String]>::to_vec),
            immutable_ids,
            changed: msg.changed,
            folder: msg.folder,
            text: text.clone(),
        });
        text
    }

    /// An updated message as Graph may serve it: `id` and the properties changed since the
    /// round's cursor (those selected), nothing else. `None` when the message is new to the
    /// round.
    fn render_partial_update(
        &self,
        mailbox: usize,
        message: usize,
        since: u64,
        select: Option<&[String]>,
        immutable_ids: bool,
    ) -> Option<Arc<str>> {
        let msg = &self.mailboxes[mailbox].messages[message];
        let mut changed = msg.changed_properties(since)?;
        if let Some(select) = select {
            changed.retain(|name| select.iter().any(|selected| selected == name));
        }
        let names: Vec<String> = changed.iter().map(|name| (*name).to_string()).collect();
        // `render` with a selection gives `id`, the etag and those properties.
        let values = self.render(mailbox, message, Some(&names), immutable_ids);
        let mut item = Map::new();
        item.insert("@odata.type".into(), json!("#microsoft.graph.message"));
        for name in std::iter::once("id").chain(changed) {
            item.insert(name.into(), values[name].clone());
        }
        Some(Value::Object(item).to_string().into())
    }

    /// A tombstone that no longer holds: its message came back to the folder after it.
    fn superseded(mailbox: &Mailbox, stone: &Tombstone) -> bool {
        mailbox
            .by_immutable
            .get(&stone.ids.immutable_id)
            .map(|&index| &mailbox.messages[index])
            .is_some_and(|msg| {
                !msg.deleted && msg.folder == stone.folder && msg.created > stone.version
            })
    }

    fn start_round(
        &mut self,
        mailbox: usize,
        cursor: &DeltaCursor,
        query: &DeltaQuery,
        behaviour: DeltaBehaviour,
    ) -> Round {
        let replay_ratio = behaviour.replay_ratio;
        let cap = behaviour.filtered_cap;
        let mailbox_ref = &self.mailboxes[mailbox];
        let since = cursor.version;
        let change_type = query.change_type.as_deref().map(str::to_ascii_lowercase);
        let wants = |kind: &str| change_type.as_deref().is_none_or(|wanted| wanted == kind);
        let mut changed: Vec<usize> = mailbox_ref
            .messages
            .iter()
            .enumerate()
            .filter(|(_, msg)| {
                !msg.deleted
                    && msg.folder == cursor.folder
                    && msg.hidden_rounds == 0
                    && msg.changed > since
                    && cursor
                        .filter
                        .as_ref()
                        .is_none_or(|clause| Self::matches(msg, clause))
                    && if msg.created > since {
                        wants("created")
                    } else {
                        wants("updated")
                    }
            })
            .map(|(index, _)| index)
            .collect();
        if cursor.filter.is_some() && changed.len() > cap {
            // A filtered round is capped: keep the most recent messages. The rest are lost
            // to this cursor for good, since the round's delta token starts after them.
            changed.sort_by_key(|&index| std::cmp::Reverse(mailbox_ref.messages[index].received));
            changed.truncate(cap);
        }
        changed.sort_by_key(|&index| (mailbox_ref.messages[index].changed, index));
        let mut items: Vec<RoundItem> = Vec::new();
        if replay_ratio > 0.0 {
            // Across rounds: the previous round's last page comes again.
            items.extend(
                cursor
                    .last_page
                    .iter()
                    .filter(|&&index| {
                        let msg = &mailbox_ref.messages[index];
                        !msg.deleted && msg.folder == cursor.folder
                    })
                    .map(|&index| RoundItem::Message(index)),
            );
        }
        items.extend(changed.into_iter().map(RoundItem::Message));
        if since > 0 && wants("deleted") {
            items.extend(
                mailbox_ref
                    .tombstones
                    .iter()
                    .filter(|stone| {
                        stone.folder == cursor.folder
                            && stone.version > since
                            // Moved out and back in since the cursor: the message itself is
                            // in the round, a removal after it would contradict it.
                            && !Self::superseded(mailbox_ref, stone)
                    })
                    .map(|stone| RoundItem::Removed {
                        ids: stone.ids.clone(),
                        reason: stone.reason,
                    }),
            );
        }
        let end_version = mailbox_ref.version;
        if replay_ratio > 0.0 {
            // Within a round: some messages come twice, later in the round.
            let mut with_replays = Vec::with_capacity(items.len());
            let mut pending: Vec<(usize, RoundItem)> = Vec::new();
            for (position, item) in items.into_iter().enumerate() {
                if matches!(item, RoundItem::Message(_)) && self.rng.random::<f64>() < replay_ratio
                {
                    let later = position + self.rng.random_range(0..8usize);
                    pending.push((later, item.clone()));
                }
                with_replays.push(item);
                let (due, rest): (Vec<_>, Vec<_>) =
                    pending.into_iter().partition(|(at, _)| *at <= position);
                with_replays.extend(due.into_iter().map(|(_, item)| item));
                pending = rest;
            }
            with_replays.extend(pending.into_iter().map(|(_, item)| item));
            items = with_replays;
        }
        Round {
            folder: cursor.folder,
            since,
            items,
            end_version,
            filter: cursor.filter.clone(),
            select: if query.delta_token.is_some() {
                cursor.select.clone()
            } else {
                query.select.clone()
            },
        }
    }

    /// Forgets every delta and skip token of a mailbox (Graph evicting its sync state cache).
    pub fn evict_delta_tokens(&mut self, mailbox: usize) {
        let mailbox = &mut self.mailboxes[mailbox];
        mailbox.delta_tokens.clear();
        mailbox.skip_tokens.clear();
        mailbox.rounds.clear();
    }
}
