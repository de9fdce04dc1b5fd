//! The MailboxPoll controller (runs on the leader): validates what the schema cannot,
//! schedules polls, handles forced polls and writes status.

pub mod conditions;
