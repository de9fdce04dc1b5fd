//! `spec.startFrom`: `all`, `now`, or an RFC 3339 time.

use chrono::{DateTime, SubsecRound, Utc};

/// The start a MailboxPoll's spec asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Every message of the folder, however old (the default).
    All,
    /// Messages received from the moment the operator first saw the MailboxPoll with this
    /// value; the instant is kept in Postgres (see `identity::start_now_at`), so later polls
    /// and resyncs use the same one.
    Now,
    /// Messages received at or after this instant.
    At(DateTime<Utc>),
}

/// A `spec.startFrom` value outside the grammar the CRD accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "spec.startFrom: {input:?} is not all, now or an RFC 3339 time such as 2026-12-01T00:00:00Z"
)]
pub struct InvalidStartFrom {
    pub input: String,
}

impl StartFrom {
    /// Parses the field; unset is `all`.
    pub fn parse(input: Option<&str>) -> Result<Self, InvalidStartFrom> {
        match input {
            None | Some("all") => Ok(Self::All),
            Some("now") => Ok(Self::Now),
            Some(text) => DateTime::parse_from_rfc3339(text)
                .map(|at| Self::At(at.with_timezone(&Utc)))
                .map_err(|_| InvalidStartFrom {
                    input: text.to_owned(),
                }),
        }
    }
}

/// The instant before which messages are skipped, once `now` is fixed; `None` admits all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Start(pub Option<DateTime<Utc>>);

impl Start {
    /// Whether a message received at `received_at` is delivered. A message without a received
    /// time (Graph always sends one; a hostile page might not) is admitted: skipping it could
    /// lose mail, delivering it cannot.
    ///
    /// Graph gives received times in whole seconds, so the start counts in whole seconds too:
    /// a message received in the same second as the start is delivered.
    pub fn admits(self, received_at: Option<DateTime<Utc>>) -> bool {
        match (self.0, received_at) {
            (Some(start), Some(received)) => received >= start.trunc_subsecs(0),
            _ => true,
        }
    }

    /// The reason recorded on a skipped message.
    pub fn skip_reason(self) -> String {
        match self.0 {
            Some(start) => format!(
                "received before spec.startFrom ({})",
                start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            None => String::new(),
        }
    }

    /// Splits messages into those admitted and those received before the start.
    pub fn split<T>(
        self,
        messages: Vec<T>,
        received_at: impl Fn(&T) -> Option<DateTime<Utc>>,
    ) -> (Vec<T>, Vec<T>) {
        messages
            .into_iter()
            .partition(|message| self.admits(received_at(message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_every_accepted_form() {
        assert_eq!(StartFrom::parse(None), Ok(StartFrom::All));
        assert_eq!(StartFrom::parse(Some("all")), Ok(StartFrom::All));
        assert_eq!(StartFrom::parse(Some("now")), Ok(StartFrom::Now));
        assert_eq!(
            StartFrom::parse(Some("2026-12-01T10:00:00+01:00")),
            Ok(StartFrom::At(at("2026-12-01T09:00:00Z")))
        );
        for bad in ["", "Now", "yesterday", "2026-12-01", "2026-12-01T10:00:00"] {
            let error = StartFrom::parse(Some(bad)).expect_err(bad);
            assert!(error.to_string().starts_with("spec.startFrom: "), "{error}");
        }
    }

    #[test]
    fn admits_messages_at_or_after_the_start() {
        let start = Start(Some(at("2026-12-01T09:00:00Z")));
        assert!(start.admits(Some(at("2026-12-01T09:00:00Z"))));
        assert!(start.admits(Some(at("2026-12-02T00:00:00Z"))));
        assert!(!start.admits(Some(at("2026-12-01T08:59:59Z"))));
        let within_a_second = Start(Some(at("2026-12-01T09:00:00.700Z")));
        assert!(
            within_a_second.admits(Some(at("2026-12-01T09:00:00Z"))),
            "Graph's whole seconds: the start's own second is delivered"
        );
        assert!(
            start.admits(None),
            "no received time: delivered, never lost"
        );
        assert!(Start(None).admits(Some(at("1999-01-01T00:00:00Z"))));
        assert_eq!(
            start.skip_reason(),
            "received before spec.startFrom (2026-12-01T09:00:00Z)"
        );
        let (admitted, skipped) = start.split(
            vec![at("2026-12-01T08:00:00Z"), at("2026-12-01T10:00:00Z")],
            |t| Some(*t),
        );
        assert_eq!(admitted, [at("2026-12-01T10:00:00Z")]);
        assert_eq!(skipped, [at("2026-12-01T08:00:00Z")]);
    }
}
