//! What a notification POST says, read without trusting it: the body is parsed into a bounded
//! list of items, each either a change (a new message) or a lifecycle event, and each item's
//! `clientState` is compared in constant time with the one the subscription was created with.

use serde::Deserialize;
use subtle::ConstantTimeEq;

/// Most items read from one notification body (Graph batches up to a few dozen); the rest
/// are ignored, which costs nothing: one item is enough to wake the MailboxPoll.
pub const MAX_ITEMS: usize = 100;

/// What one item asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A message was created: poll now.
    Changed,
    /// Graph wants the subscription reauthorized (renewed) or it will stop.
    ReauthorizationRequired,
    /// Graph removed the subscription: create it again, and poll (changes may be lost).
    SubscriptionRemoved,
    /// Graph could not deliver some notifications: poll now.
    Missed,
}

/// One item of a notification body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub subscription_id: String,
    pub client_state: Option<String>,
    pub signal: Signal,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("the notification body is not a JSON object with a value array")]
    NotJson,
    #[error("unknown lifecycle event {0:?}")]
    UnknownLifecycleEvent(String),
}

#[derive(Deserialize)]
struct Body {
    value: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawItem {
    subscription_id: String,
    #[serde(default)]
    client_state: Option<String>,
    #[serde(default)]
    lifecycle_event: Option<String>,
}

/// Parses a notification body. Items that are not objects with a `subscriptionId` string are
/// skipped (they cannot be matched to anything); an unknown lifecycle event is skipped too.
pub fn parse(body: &[u8]) -> Result<Vec<Item>, PayloadError> {
    let body: Body = serde_json::from_slice(body).map_err(|_| PayloadError::NotJson)?;
    Ok(body
        .value
        .into_iter()
        .take(MAX_ITEMS)
        .filter_map(|value| serde_json::from_value::<RawItem>(value).ok())
        .filter_map(|raw| {
            let signal = match raw.lifecycle_event.as_deref() {
                None => Signal::Changed,
                Some(event) => lifecycle_signal(event).ok()?,
            };
            Some(Item {
                subscription_id: raw.subscription_id,
                client_state: raw.client_state,
                signal,
            })
        })
        .collect())
}

fn lifecycle_signal(event: &str) -> Result<Signal, PayloadError> {
    // Graph's event names are camelCase; compare case-insensitively, as with error codes.
    match event.to_ascii_lowercase().as_str() {
        "reauthorizationrequired" => Ok(Signal::ReauthorizationRequired),
        "subscriptionremoved" => Ok(Signal::SubscriptionRemoved),
        "missed" => Ok(Signal::Missed),
        _ => Err(PayloadError::UnknownLifecycleEvent(event.to_string())),
    }
}

/// Whether a notification's clientState is the subscription's, in time that does not depend
/// on where they differ (a forger learns nothing from how fast a guess is refused).
pub fn client_state_matches(expected: &str, received: Option<&str>) -> bool {
    let Some(received) = received else {
        return false;
    };
    // Unequal lengths answer at once; the length is not the secret (every state is as long).
    bool::from(expected.as_bytes().ct_eq(received.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_and_lifecycle_events() {
        let body = br#"{"value":[
            {"subscriptionId":"s1","clientState":"c","changeType":"created","resource":"Users/x/Messages/y"},
            {"subscriptionId":"s1","clientState":"c","lifecycleEvent":"missed"},
            {"subscriptionId":"s1","clientState":"c","lifecycleEvent":"subscriptionRemoved"},
            {"subscriptionId":"s1","lifecycleEvent":"reauthorizationRequired"},
            {"subscriptionId":"s1","lifecycleEvent":"somethingNew"},
            {"clientState":"c"},
            42
        ]}"#;
        let items = parse(body).expect("parses");
        let signals: Vec<Signal> = items.iter().map(|item| item.signal).collect();
        assert_eq!(
            signals,
            [
                Signal::Changed,
                Signal::Missed,
                Signal::SubscriptionRemoved,
                Signal::ReauthorizationRequired
            ]
        );
        assert_eq!(items[0].client_state.as_deref(), Some("c"));
        assert_eq!(items[3].client_state, None);
    }

    #[test]
    fn hostile_bodies_are_refused_or_bounded() {
        assert_eq!(parse(b"not json"), Err(PayloadError::NotJson));
        assert_eq!(parse(b"{\"value\":{}}"), Err(PayloadError::NotJson));
        assert_eq!(parse(b"[]"), Err(PayloadError::NotJson));
        let many: Vec<String> = (0..500)
            .map(|i| format!("{{\"subscriptionId\":\"s{i}\",\"clientState\":\"c\"}}"))
            .collect();
        let body = format!("{{\"value\":[{}]}}", many.join(","));
        assert_eq!(parse(body.as_bytes()).expect("parses").len(), MAX_ITEMS);
    }

    #[test]
    fn client_state_must_match_exactly() {
        assert!(client_state_matches("secret-state", Some("secret-state")));
        assert!(!client_state_matches("secret-state", Some("secret-statf")));
        assert!(!client_state_matches("secret-state", Some("secret")));
        assert!(!client_state_matches("secret-state", Some("")));
        assert!(!client_state_matches("secret-state", None));
    }
}
