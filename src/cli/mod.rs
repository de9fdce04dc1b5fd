//! What the `mailpoll` command does for people during an incident: the task queue and the
//! ledger as tables, one task in full, bulk retry and cancel. The queries belong to their
//! tables' owners (queue, ledger, identity); this module parses, calls and renders.

pub mod commands;
pub mod messages;
pub mod table;
pub mod tasks;
