//! mailpoll: a Kubernetes operator that polls Microsoft 365 mailboxes through Microsoft Graph,
//! records every message once in Postgres and delivers it once.

pub mod controller;
pub mod db;
pub mod delivery;
pub mod graph;
pub mod http;
pub mod leader;
pub mod ledger;
pub mod operator;
pub mod pipeline;
pub mod queue;
pub mod resource;
pub mod tasks_cli;
pub mod telemetry;

/// Installs the process-wide TLS crypto provider (ring). reqwest and kube are built without a
/// default provider so exactly one is in the tree; call this before building any client.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
