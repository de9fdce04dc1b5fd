//! A cluster for operator tests: the Kubernetes API emulator with the MailboxPoll CRD, the
//! Graph emulator, a fresh database, and helpers to create namespaces, Secrets and
//! MailboxPolls.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use mailpoll::resource::MailboxPoll;
use serde_json::json;

use crate::graph::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT};
use crate::wait::try_wait_for;

pub const CRD_NAME: &str = "mailboxpolls.mailpoll.dev";

/// Applies the MailboxPoll CRD and waits until it is Established.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply("mailpoll-tests").force(),
        &Patch::Apply(MailboxPoll::crd()),
    )
    .await
    .context("applying the MailboxPoll CRD")?;
    try_wait_for(
        "the CRD to be Established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get(CRD_NAME).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await?;
    Ok(())
}

pub async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// A credentials Secret for the Graph emulator's default app, with `client_secret` as its
/// client secret (pass a wrong one to test authentication failures).
pub async fn create_credentials(
    client: &Client,
    namespace: &str,
    name: &str,
    client_secret: &str,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name},
                "stringData": {
                    "tenantId": DEFAULT_TENANT,
                    "clientId": DEFAULT_CLIENT_ID,
                    "clientSecret": client_secret,
                }
            }))?,
        )
        .await
        .with_context(|| format!("creating Secret {namespace}/{name}"))?;
    Ok(())
}

/// The emulator's valid client secret.
pub fn valid_client_secret() -> &'static str {
    DEFAULT_CLIENT_SECRET
}

/// A MailboxPoll of `mailbox` every `interval`, credentials from Secret `secret`.
pub fn mailbox_poll(name: &str, mailbox: &str, interval: &str, secret: &str) -> MailboxPoll {
    serde_json::from_value(json!({
        "apiVersion": "mailpoll.dev/v1alpha1",
        "kind": "MailboxPoll",
        "metadata": {"name": name},
        "spec": {
            "mailbox": mailbox,
            "interval": interval,
            "credentialsSecretRef": {"name": secret},
        }
    }))
    .expect("a MailboxPoll built from a literal deserializes")
}
