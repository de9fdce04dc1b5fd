//! Change-notification subscriptions (`/v1.0/subscriptions`): create, renew, delete. They go
//! through the mailbox's governor like every other call, so tokens, throttling and
//! `Retry-After` apply to them too.

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;

use super::{Call, GraphError, MailboxClient};

/// What a new subscription asks for.
#[derive(Debug, Clone)]
pub struct SubscriptionRequest {
    /// The folder whose new messages are notified (id or well-known name).
    pub folder: String,
    pub notification_url: String,
    pub lifecycle_notification_url: String,
    /// Echoed in every notification; proves a notification comes from this subscription.
    pub client_state: String,
    pub expiration: DateTime<Utc>,
}

/// A subscription as Graph returned it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: String,
    pub expiration_date_time: DateTime<Utc>,
}

impl MailboxClient {
    /// `{graph}/v1.0/subscriptions[/{id}]`.
    fn subscriptions_url(&self, id: Option<&str>) -> Result<Url, GraphError> {
        let mut url = self.client.inner.config.graph_url.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|_| GraphError::Config("Graph URL cannot have a path".into()))?;
            segments.pop_if_empty().extend(["v1.0", "subscriptions"]);
            if let Some(id) = id {
                segments.push(id);
            }
        }
        Ok(url)
    }

    /// The subscription's resource: the folder's messages of this mailbox.
    pub fn subscription_resource(&self, folder: &str) -> String {
        format!("users/{}/mailFolders/{folder}/messages", self.mailbox)
    }

    /// `POST /subscriptions` for new messages (`changeType` created) of a folder. Graph calls
    /// the notification URLs to validate them before it answers.
    pub async fn create_subscription(
        &self,
        request: &SubscriptionRequest,
    ) -> Result<Subscription, GraphError> {
        let call = Call {
            method: Method::POST,
            url: self.subscriptions_url(None)?,
            prefer: Vec::new(),
            body: Some(json!({
                "changeType": "created",
                "notificationUrl": request.notification_url,
                "lifecycleNotificationUrl": request.lifecycle_notification_url,
                "resource": self.subscription_resource(&request.folder),
                "expirationDateTime": format_time(request.expiration),
                "clientState": request.client_state,
            })),
            weight: 1,
        };
        parse(&self.execute(&call).await?.body)
    }

    /// `PATCH /subscriptions/{id}` with a new expiration (also what Graph accepts as the
    /// answer to `reauthorizationRequired`).
    pub async fn renew_subscription(
        &self,
        id: &str,
        expiration: DateTime<Utc>,
    ) -> Result<Subscription, GraphError> {
        let call = Call {
            method: Method::PATCH,
            url: self.subscriptions_url(Some(id))?,
            prefer: Vec::new(),
            body: Some(json!({ "expirationDateTime": format_time(expiration) })),
            weight: 1,
        };
        parse(&self.execute(&call).await?.body)
    }

    /// `DELETE /subscriptions/{id}`; a subscription already gone is not an error.
    pub async fn delete_subscription(&self, id: &str) -> Result<(), GraphError> {
        let call = Call {
            method: Method::DELETE,
            url: self.subscriptions_url(Some(id))?,
            prefer: Vec::new(),
            body: None,
            weight: 1,
        };
        match self.execute(&call).await {
            Ok(_) => Ok(()),
            Err(error) if is_subscription_gone(&error) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// Whether Graph answered that the subscription does not exist (expired or removed): 404.
pub fn is_subscription_gone(error: &GraphError) -> bool {
    matches!(
        error,
        GraphError::MailboxNotFound { .. } | GraphError::ItemNotFound { .. }
    )
}

fn format_time(moment: DateTime<Utc>) -> String {
    moment.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse(body: &[u8]) -> Result<Subscription, GraphError> {
    serde_json::from_slice(body).map_err(|_| GraphError::MalformedResponse {
        message: "a subscription answer is not a subscription".into(),
        request_id: None,
    })
}
