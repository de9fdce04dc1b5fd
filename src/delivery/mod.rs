//! Delivery of recorded messages: the signed webhook POST, its endpoint and its contract.
//!
//! Deliveries are at-least-once toward the receiver and exactly-once in effect: every request
//! for a message carries the same idempotency key, and once the ledger says delivered the
//! message is never sent again.

pub mod content;
pub mod egress;
pub mod endpoint;
pub mod fetch;
pub mod format;
pub mod signing;
pub mod webhook;
