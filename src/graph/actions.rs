//! Post-actions on single messages (mark read, move), the raw MIME, and a `$batch` of
//! post-actions. A 404 `ErrorItemNotFound` comes back as [`GraphError::ItemNotFound`]: after a
//! move it is normal, and the caller knows whether the action already took effect.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::error::{FailedResponse, GraphError};
use super::message::Message;
use super::{Call, MailboxClient, parse_retry_after};

/// Largest `$batch` Graph accepts.
pub const MAX_BATCH: usize = 20;

/// An action on a delivered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostAction {
    MarkRead {
        message_id: String,
    },
    Move {
        message_id: String,
        destination: String,
    },
}

impl PostAction {
    fn request(&self, mailbox: &str, id: usize) -> Value {
        let escape = |text: &str| {
            percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        let headers =
            json!({"Content-Type": "application/json", "Prefer": "IdType=\"ImmutableId\""});
        match self {
            PostAction::MarkRead { message_id } => json!({
                "id": id.to_string(),
                "method": "PATCH",
                "url": format!("/users/{}/messages/{}", escape(mailbox), escape(message_id)),
                "headers": headers,
                "body": {"isRead": true},
            }),
            PostAction::Move {
                message_id,
                destination,
            } => json!({
                "id": id.to_string(),
                "method": "POST",
                "url": format!("/users/{}/messages/{}/move", escape(mailbox), escape(message_id)),
                "headers": headers,
                "body": {"destinationId": destination},
            }),
        }
    }
}

impl MailboxClient {
    /// `PATCH .../messages/{id}` with `{"isRead":true}`. Needs Mail.ReadWrite.
    pub async fn mark_read(&self, message_id: &str) -> Result<(), GraphError> {
        let call = Call {
            method: Method::PATCH,
            url: self.url(&["messages", message_id])?,
            prefer: Vec::new(),
            body: Some(json!({"isRead": true})),
            weight: 1,
        };
        self.execute(&call).await.map(|_| ())
    }

    /// `POST .../messages/{id}/move`; returns the moved message (same immutable id).
    pub async fn move_message(
        &self,
        message_id: &str,
        destination: &str,
    ) -> Result<Message, GraphError> {
        let call = Call {
            method: Method::POST,
            url: self.url(&["messages", message_id, "move"])?,
            prefer: Vec::new(),
            body: Some(json!({"destinationId": destination})),
            weight: 1,
        };
        let reply = self.execute(&call).await?;
        let value: Value =
            serde_json::from_slice(&reply.body).map_err(|_| GraphError::MalformedResponse {
                message: format!("move answered {} without a message", reply.status),
                request_id: reply.request_id.clone(),
            })?;
        Message::from_value(value, self.graph().config().max_body_chars).map_err(|reason| {
            GraphError::MalformedResponse {
                message: format!("moved message: {reason}"),
                request_id: reply.request_id,
            }
        })
    }

    /// Whether the message still exists in the mailbox (in any folder: immutable ids survive
    /// moves). `GET .../messages/{id}?$select=id`; a 404 `ErrorItemNotFound` means gone.
    ///
    /// Graph answers a move to a destination folder that does not exist with the same 404
    /// `ErrorItemNotFound` as a move of a message that is gone (only the message text differs,
    /// and decisions never rest on message text), so after such a 404 this tells them apart.
    pub async fn message_exists(&self, message_id: &str) -> Result<bool, GraphError> {
        let mut url = self.url(&["messages", message_id])?;
        url.query_pairs_mut().append_pair("$select", "id");
        let call = Call {
            method: Method::GET,
            url,
            prefer: Vec::new(),
            body: None,
            weight: 1,
        };
        match self.execute(&call).await {
            Ok(_) => Ok(true),
            Err(GraphError::ItemNotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The message as RFC 5322 bytes (`GET .../messages/{id}/$value`).
    pub async fn get_mime(&self, message_id: &str) -> Result<Vec<u8>, GraphError> {
        let call = Call {
            method: Method::GET,
            url: self.url(&["messages", message_id, "$value"])?,
            prefer: Vec::new(),
            body: None,
            weight: 1,
        };
        Ok(self.execute(&call).await?.body)
    }

    /// Runs post-actions through `$batch` (20 per envelope). Returns one result per action, in
    /// order. Inner requests that were throttled or failed transiently are sent again after
    /// the mailbox's pause, up to the governor's retry limit; the error of the envelope itself
    /// (auth, mailbox state) fails the whole call.
    pub async fn post_actions(
        &self,
        actions: &[PostAction],
    ) -> Result<Vec<Result<(), GraphError>>, GraphError> {
        let mut results: Vec<Option<Result<(), GraphError>>> = vec![None; actions.len()];
        for chunk_start in (0..actions.len()).step_by(MAX_BATCH) {
            let chunk_end = (chunk_start + MAX_BATCH).min(actions.len());
            let mut pending: Vec<usize> = (chunk_start..chunk_end).collect();
            let mut attempt: u32 = 0;
            while !pending.is_empty() {
                let outcomes = self.batch_once(actions, &pending).await?;
                let mut retry = Vec::new();
                let mut longest_wait: Option<Duration> = None;
                let mut throttled = false;
                for (index, outcome) in pending.iter().copied().zip(outcomes) {
                    match outcome {
                        Err(failed) if failed.is_retryable() => {
                            throttled |= failed.status == 429;
                            if let Some(wait) = failed.retry_after {
                                longest_wait = Some(longest_wait.map_or(wait, |w| w.max(wait)));
                            }
                            if attempt >= self.graph().governor().config().max_retries {
                                results[index] = Some(Err(failed.into_error()));
                            } else {
                                retry.push(index);
                            }
                        }
                        Err(failed) => results[index] = Some(Err(failed.into_error())),
                        Ok(()) => results[index] = Some(Ok(())),
                    }
                }
                let governor = self.graph().governor();
                match longest_wait {
                    Some(wait) => governor.report_retry_after(self.mailbox(), wait),
                    // A 429 without a wait still pauses the mailbox, for at least the floor.
                    None if throttled => governor
                        .report_retry_after(self.mailbox(), governor.throttle_backoff(attempt)),
                    None if !retry.is_empty() => {
                        tokio::time::sleep(governor.backoff(attempt)).await
                    }
                    None => {}
                }
                pending = retry;
                attempt += 1;
            }
        }
        Ok(results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(GraphError::MalformedResponse {
                        message: "no answer for a batch request".into(),
                        request_id: None,
                    })
                })
            })
            .collect())
    }

    /// One `$batch` envelope for `pending` actions; per action `Ok` or its failed response.
    async fn batch_once(
        &self,
        actions: &[PostAction],
        pending: &[usize],
    ) -> Result<Vec<Result<(), FailedResponse>>, GraphError> {
        let requests: Vec<Value> = pending
            .iter()
            .map(|&index| actions[index].request(self.mailbox(), index))
            .collect();
        let mut url = self.graph().config().graph_url.clone();
        url.path_segments_mut()
            .map_err(|_| GraphError::Config("Graph URL cannot have a path".into()))?
            .pop_if_empty()
            .extend(["v1.0", "$batch"]);
        let call = Call {
            method: Method::POST,
            url,
            prefer: Vec::new(),
            body: Some(json!({"requests": requests})),
            weight: u32::try_from(pending.len()).unwrap_or(u32::MAX),
        };
        let reply = self.execute(&call).await?;
        let malformed = |message: &str| GraphError::MalformedResponse {
            message: format!("$batch: {message}"),
            request_id: reply.request_id.clone(),
        };
        let envelope: Value =
            serde_json::from_slice(&reply.body).map_err(|_| malformed("not valid JSON"))?;
        let responses = envelope
            .get("responses")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("no responses array"))?;
        let mut by_id = std::collections::HashMap::new();
        for response in responses {
            if let Some(id) = response.get("id").and_then(Value::as_str) {
                by_id.insert(id.to_string(), response);
            }
        }
        Ok(pending
            .iter()
            .map(|index| inner_result(by_id.get(&index.to_string()).copied()))
            .collect())
    }
}

/// The outcome of one inner request of a `$batch` answer (`None`: the answer lacks it).
fn inner_result(response: Option<&Value>) -> Result<(), FailedResponse> {
    let Some(response) = response else {
        return Err(FailedResponse {
            status: 502,
            code: "MissingBatchResponse".into(),
            message: "the batch answer lacks this request".into(),
            ..FailedResponse::default()
        });
    };
    let status = response
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|status| u16::try_from(status).ok())
        .unwrap_or(502);
    if (200..300).contains(&status) {
        return Ok(());
    }
    let header = |name: &str| {
        response
            .get("headers")
            .and_then(Value::as_object)
            .and_then(|headers| {
                headers
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                    .and_then(|(_, value)| value.as_str())
                    .map(str::to_string)
            })
    };
    let body = response
        .get("body")
        .map(|body| body.to_string())
        .unwrap_or_default();
    Err(FailedResponse::parse(
        status,
        body.as_bytes(),
        header("request-id"),
        header("retry-after").and_then(|value| parse_retry_after(&value)),
        None,
    ))
}
