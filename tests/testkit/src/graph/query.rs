//! OData query options as the emulator understands them: `$select`, `$top`, `$filter`,
//! `$orderby`, with the rules Graph enforces on message lists. Pure parsing, no state.

use chrono::{DateTime, Utc};

use super::state::ApiError;

/// Message properties the emulator can select, filter and order by.
pub const MESSAGE_PROPERTIES: &[&str] = &[
    "id",
    "internetMessageId",
    "subject",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "replyTo",
    "receivedDateTime",
    "sentDateTime",
    "createdDateTime",
    "lastModifiedDateTime",
    "hasAttachments",
    "isRead",
    "parentFolderId",
    "conversationId",
    "bodyPreview",
    "body",
    "categories",
    "importance",
    "webLink",
];

/// A comparison operator of `$filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            "lt" => Op::Lt,
            "le" => Op::Le,
            _ => return None,
        })
    }

    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Eq => ordering == Equal,
            Op::Ne => ordering != Equal,
            Op::Gt => ordering == Greater,
            Op::Ge => ordering != Less,
            Op::Lt => ordering == Less,
            Op::Le => ordering != Greater,
        }
    }
}

/// A literal of `$filter`.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    DateTime(DateTime<Utc>),
    Bool(bool),
    Text(String),
}

/// One `property op literal` clause; clauses are joined by `and`.
#[derive(Clone, Debug, PartialEq)]
pub struct Clause {
    pub property: String,
    pub op: Op,
    pub value: Literal,
}

/// One `$orderby` key.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderKey {
    pub property: String,
    pub descending: bool,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "ErrorInvalidUrlQuery", message)
}

fn check_property(name: &str) -> Result<String, ApiError> {
    MESSAGE_PROPERTIES
        .iter()
        .find(|known| known.eq_ignore_ascii_case(name))
        .map(|known| (*known).to_string())
        .ok_or_else(|| {
            ApiError::new(
                400,
                "RequestBroker--ParseUri",
                format!(
                    "Could not find a property named '{name}' on type 'microsoft.graph.message'."
                ),
            )
        })
}

/// `$select=a,b,c`: known properties, in the order given.
pub fn parse_select(text: &str) -> Result<Vec<String>, ApiError> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(check_property)
        .collect()
}

/// `$top`: 1 to 1000.
pub fn parse_top(text: &str) -> Result<usize, ApiError> {
    match text.trim().parse::<usize>() {
        Ok(top) if (1..=1000).contains(&top) => Ok(top),
        _ => Err(invalid(format!(
            "The value '{text}' of $top is invalid: it must be between 1 and 1000."
        ))),
    }
}

/// `$filter`: clauses joined by `and`. Dates are unquoted ISO-8601, strings single-quoted.
pub fn parse_filter(text: &str) -> Result<Vec<Clause>, ApiError> {
    let mut clauses = Vec::new();
    for part in split_and(text) {
        let mut words = part.splitn(3, ' ').map(str::trim);
        let (Some(property), Some(op), Some(value)) = (words.next(), words.next(), words.next())
        else {
            return Err(invalid(format!("Invalid filter clause '{part}'.")));
        };
        let property = check_property(property)?;
        let op = Op::parse(op).ok_or_else(|| invalid(format!("Unknown operator '{op}'.")))?;
        let value = parse_literal(value)?;
        clauses.push(Clause {
            property,
            op,
            value,
        });
    }
    if clauses.is_empty() {
        return Err(invalid("Empty $filter."));
    }
    Ok(clauses)
}

fn split_and(text: &str) -> Vec<&str> {
    let lower = text.to_ascii_lowercase();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find(" and ") {
        let at = search + found;
        // An " and " inside a quoted string is text, not a conjunction.
        let quotes = text[start..at].matches('\'').count();
        if quotes.is_multiple_of(2) {
            parts.push(text[start..at].trim());
            start = at + 5;
        }
        search = at + 5;
    }
    parts.push(text[start..].trim());
    parts.into_iter().filter(|part| !part.is_empty()).collect()
}

fn parse_literal(text: &str) -> Result<Literal, ApiError> {
    if let Some(inner) = text
        .strip_prefix('\'')
        .and_then(|rest| rest.strip_suffix('\''))
    {
        return Ok(Literal::Text(inner.replace("''", "'")));
    }
    match text {
        "true" => return Ok(Literal::Bool(true)),
        "false" => return Ok(Literal::Bool(false)),
        _ => {}
    }
    DateTime::parse_from_rfc3339(text)
        .map(|moment| Literal::DateTime(moment.with_timezone(&Utc)))
        .map_err(|_| invalid(format!("The literal '{text}' is not valid.")))
}

/// `$orderby=a desc,b`.
pub fn parse_orderby(text: &str) -> Result<Vec<OrderKey>, ApiError> {
    let mut keys = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut words = part.split_whitespace();
        let property = check_property(words.next().unwrap_or_default())?;
        let descending = match words.next().map(str::to_ascii_lowercase).as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => return Err(invalid(format!("Unknown sort direction '{other}'."))),
        };
        keys.push(OrderKey {
            property,
            descending,
        });
    }
    Ok(keys)
}

/// Graph's rule for lists: with `$filter` and `$orderby` together, the ordered properties
/// must come first in the filter, in the same order.
pub fn check_filter_order(filter: &[Clause], order: &[OrderKey]) -> Result<(), ApiError> {
    if filter.is_empty() || order.is_empty() {
        return Ok(());
    }
    let in_order = order.len() <= filter.len()
        && order
            .iter()
            .zip(filter)
            .all(|(key, clause)| key.property == clause.property);
    if in_order {
        Ok(())
    } else {
        Err(ApiError::new(
            400,
            "InefficientFilter",
            "The restriction or sort order is too complex for this operation.",
        ))
    }
}

/// The delta `$filter`: only `receivedDateTime ge|gt <date>`.
pub fn parse_delta_filter(text: &str) -> Result<Clause, ApiError> {
    let clauses = parse_filter(text)?;
    match clauses.as_slice() {
        [
            clause @ Clause {
                op: Op::Ge | Op::Gt,
                value: Literal::DateTime(_),
                ..
            },
        ] if clause.property == "receivedDateTime" => Ok(clause.clone()),
        _ => Err(invalid(
            "Delta query on messages supports only receivedDateTime ge|gt as $filter.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_parses_dates_bools_and_strings() {
        let clauses = parse_filter(
            "receivedDateTime ge 2025-03-04T10:15:02Z and isRead eq false and subject eq 'a and b'",
        )
        .expect("valid filter");
        assert_eq!(clauses.len(), 3);
        assert_eq!(clauses[0].op, Op::Ge);
        assert_eq!(clauses[1].value, Literal::Bool(false));
        assert_eq!(clauses[2].value, Literal::Text("a and b".into()));
    }

    #[test]
    fn orderby_must_lead_the_filter() {
        let filter = parse_filter("isRead eq false and receivedDateTime ge 2025-03-04T10:15:02Z")
            .expect("valid filter");
        let order = parse_orderby("receivedDateTime desc").expect("valid orderby");
        let error = check_filter_order(&filter, &order).expect_err("inefficient");
        assert_eq!(error.code, "InefficientFilter");
        let filter = parse_filter("receivedDateTime ge 2025-03-04T10:15:02Z and isRead eq false")
            .expect("valid filter");
        check_filter_order(&filter, &order).expect("ordered property first");
    }

    #[test]
    fn unknown_properties_and_bad_top_are_rejected() {
        assert!(parse_select("id,nonsense").is_err());
        assert!(parse_top("0").is_err());
        assert!(parse_top("1001").is_err());
        assert_eq!(parse_top("1000").expect("max top"), 1000);
    }

    #[test]
    fn delta_filter_accepts_only_received_lower_bounds() {
        assert!(parse_delta_filter("receivedDateTime ge 2025-03-04T10:15:02Z").is_ok());
        assert!(parse_delta_filter("receivedDateTime le 2025-03-04T10:15:02Z").is_err());
        assert!(parse_delta_filter("isRead eq false").is_err());
    }
}
