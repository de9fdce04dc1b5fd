//! Webhook signatures per the Standard Webhooks specification (<https://www.standardwebhooks.com>),
//! so receivers verify with a maintained library in their language instead of code of their own.
//!
//! Each request carries `webhook-id` (the message's idempotency key, the same for every retry),
//! `webhook-timestamp` (Unix seconds when this attempt was signed) and, with a signing secret,
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`. The signing
//! itself is the specification's reference crate.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use standardwebhooks::{
    HEADER_WEBHOOK_ID as ID_HEADER, HEADER_WEBHOOK_SIGNATURE as SIGNATURE_HEADER,
    HEADER_WEBHOOK_TIMESTAMP as TIMESTAMP_HEADER,
};

/// The idempotency key again, under the name most HTTP APIs use for it.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// 1 for the first request of a message, 2 for its first retry, and so on.
pub const ATTEMPT_HEADER: &str = "Mailpoll-Delivery-Attempt";

/// The prefix Standard Webhooks libraries accept (and strip) in front of the base64 secret.
const SECRET_PREFIX: &str = "whsec_";
/// The specification asks for secrets of 24 to 64 random bytes.
const MIN_SECRET_BYTES: usize = 24;
const MAX_SECRET_BYTES: usize = 64;

/// A signing secret read from a Secret. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SigningSecret(Arc<standardwebhooks::Webhook>);

/// Why a Secret's value is not a usable signing secret. Never includes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSigningSecret {
    #[error("the value is not text")]
    NotText,
    #[error(
        "the value is not base64 (Standard Webhooks secrets are whsec_ followed by base64, for example what `openssl rand -base64 32` prints)"
    )]
    NotBase64,
    #[error(
        "the key is {0} bytes; Standard Webhooks secrets are {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes"
    )]
    WrongLength(usize),
}

impl SigningSecret {
    /// Parses the value as receivers' libraries do: an optional `whsec_` prefix, then base64.
    /// Surrounding whitespace (a value written with `echo`) is ignored.
    pub fn parse(value: &[u8]) -> Result<Self, InvalidSigningSecret> {
        let text = std::str::from_utf8(value).map_err(|_| InvalidSigningSecret::NotText)?;
        let encoded = text.trim();
        let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
        let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded)
            .map_err(|_| InvalidSigningSecret::NotBase64)?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(InvalidSigningSecret::WrongLength(key.len()));
        }
        let webhook = standardwebhooks::Webhook::from_bytes(key)
            .map_err(|_| InvalidSigningSecret::NotBase64)?;
        Ok(Self(Arc::new(webhook)))
    }

    /// The `webhook-signature` value of one request. `None` when the body is not UTF-8,
    /// which the specification's libraries cannot sign or verify (JSON always is).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
        self.0.sign(id, timestamp, body).ok()
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// The idempotency key of a message: stable across retries, replays and resyncs, and safe in
/// an HTTP header whatever characters the Graph id holds.
pub fn message_key(mailbox_uid: Uuid, message_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(mailbox_uid.as_bytes());
    hasher.update(b":");
    hasher.update(message_id.as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn secrets_are_read_as_receivers_libraries_read_them() {
        let prefixed = SigningSecret::parse(SECRET.as_bytes()).expect("prefixed");
        let bare = SigningSecret::parse(SECRET.trim_start_matches("whsec_").as_bytes())
            .expect("bare base64");
        let echoed = SigningSecret::parse(format!("{SECRET}\n").as_bytes()).expect("newline");
        let signature = |secret: &SigningSecret| secret.sign("k", 1, b"{}");
        assert_eq!(signature(&prefixed), signature(&bare));
        assert_eq!(signature(&prefixed), signature(&echoed));
    }

    #[test]
    fn unusable_secrets_say_why_without_the_value() {
        assert_eq!(
            SigningSecret::parse(b"\xff\x00junk").err(),
            Some(InvalidSigningSecret::NotText)
        );
        assert_eq!(
            SigningSecret::parse(b"hunter2 is my password").err(),
            Some(InvalidSigningSecret::NotBase64)
        );
        assert_eq!(
            SigningSecret::parse(b"whsec_c2hvcnQ=").err(),
            Some(InvalidSigningSecret::WrongLength(5))
        );
        let error = SigningSecret::parse(b"hunter2 is my password")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!error.contains("hunter2"), "{error}");
        assert_eq!(
            format!("{:?}", SigningSecret::parse(SECRET.as_bytes())),
            "Ok(SigningSecret(<redacted>))"
        );
    }

    #[test]
    fn message_keys_are_stable_and_distinct() {
        let uid = Uuid::nil();
        assert_eq!(message_key(uid, "AAk="), message_key(uid, "AAk="));
        assert_ne!(message_key(uid, "AAk="), message_key(uid, "aak="));
        assert_ne!(
            message_key(uid, "AAk="),
            message_key(Uuid::from_u128(1), "AAk=")
        );
        assert_eq!(message_key(uid, "x").len(), 64);
    }
}
