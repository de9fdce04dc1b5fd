//! Which recorded messages are delivered: `spec.startFrom` (decided when a page is recorded:
//! older messages are recorded as skipped) and `spec.filter` (decided before delivery:
//! rejected messages are recorded as filtered). Pure logic; the ledger records the outcome.

pub mod filter;
pub mod start;

pub use filter::{Filter, FilterError, Verdict};
pub use start::{InvalidStartFrom, StartFrom};
