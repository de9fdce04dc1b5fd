//! mailpoll: a Kubernetes operator that polls Microsoft 365 mailboxes through Microsoft Graph,
//! records every message once in Postgres and delivers it once.

//!
//! Rooms, lower ones first (a room uses only rooms above it in this list; a test checks it):
//! - foundations: `reason` (why things fail), `storable` (outside text made storable),
//!   `resource` (the MailboxPoll type), `db`, `telemetry`;
//! - storage, one owner per table: `queue` (`tasks`), `cursor` (`mailbox_cursors`), `ledger`
//!   (`messages`), `poll_log` (`polls`, `poll_requests`), `identity` (`mailbox_identities`);
//! - outside systems: `graph` (Microsoft Graph), `delivery` (the webhook contract),
//!   `directory` (MailboxPolls and their Secrets, on every replica);
//! - work: `pipeline` (the poll, deliver and actions tasks);
//! - leadership: `controller` (what only the leader runs), `leader` (the election);
//! - `notifications` (Graph change notifications: the leader's subscriptions, every
//!   replica's endpoint);
//! - process: `http`, `operator`, `tasks_cli`.

pub mod admission;
pub mod cli;
pub mod controller;
pub mod cursor;
pub mod db;
pub mod delivery;
pub mod directory;
pub mod graph;
pub mod http;
pub mod identity;
pub mod leader;
pub mod ledger;
pub mod mailbox_slots;
pub mod notifications;
pub mod operator;
pub mod pipeline;
pub mod poll_log;
pub mod queue;
pub mod reason;
pub mod resource;
pub mod retention;
pub mod selection;
pub mod storable;
pub mod telemetry;

/// Installs the process-wide TLS crypto provider (ring). reqwest and kube are built without a
/// default provider so exactly one is in the tree; call this before building any client.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
