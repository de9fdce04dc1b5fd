//! The test world of mailpoll: a throwaway Postgres, validation of custom resources as an API
//! server does it, and (in later modules) the emulators of Microsoft Graph and the Kubernetes
//! API. Never linked into the shipped binary.

pub mod cluster;
pub mod crd_validation;
pub mod directory;
pub mod graph;
pub mod kube;
pub mod pg;
pub mod sandbox;
pub mod webhook_receiver;

/// Polls `check` every 50 ms until it holds; panics with `what` once `limit` has passed.
/// Tests wait for outcomes this way instead of sleeping for a guessed time.
pub async fn wait_until<F, Fut>(what: &str, limit: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
