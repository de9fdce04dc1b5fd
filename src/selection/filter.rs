//! `spec.filter`: a CEL expression over one message, `true` to deliver it.
//!
//! The expression sees one variable, `message` (see [`message_value`] for its fields). It is
//! compiled and checked when the configuration is resolved, so a broken filter stops the
//! MailboxPoll with a condition naming `spec.filter` instead of failing every delivery. The
//! `cel` crate has no type checker: unknown variables and fields are found by walking the
//! expression, type errors and non-boolean results by evaluating it against a sample message
//! with every field set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr};
use cel::objects::Key;
use cel::{Context, ExecutionError, IdedExpr, Program, Value};
use chrono::{DateTime, Utc};

use crate::ledger::LedgerMessage;

/// Longest filter accepted (the CRD's schema bounds it too).
pub const MAX_FILTER_CHARS: usize = 4096;

/// The variable the expression sees.
const MESSAGE: &str = "message";

/// Fields of `message`, and for the address fields, the fields of an address.
const MESSAGE_FIELDS: &[&str] = &[
    "id",
    "internetMessageId",
    "conversationId",
    "subject",
    "bodyPreview",
    "importance",
    "isRead",
    "hasAttachments",
    "categories",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "replyTo",
    "receivedDateTime",
    "sentDateTime",
];
const ADDRESS_FIELDS: &[&str] = &["address", "name"];
const ADDRESS_OBJECTS: &[&str] = &["from", "sender"];

/// Why a filter cannot be used; the text names `spec.filter`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.filter: {detail}")]
pub struct FilterError {
    pub detail: String,
}

fn invalid(detail: impl Into<String>) -> FilterError {
    FilterError {
        detail: detail.into(),
    }
}

/// A compiled, checked filter.
#[derive(Debug, Clone)]
pub struct Filter {
    source: Arc<str>,
    program: Arc<Program>,
}

impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// What a filter decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// Not delivered; the reason is recorded on the message.
    Filtered(String),
    /// The expression failed on this message (a field it indexes is missing, a function
    /// refused its input): the message is delivered, as if there were no filter, so that a
    /// filter never loses mail by accident. The error is logged.
    Undecided(String),
}

impl Filter {
    /// Compiles and checks `source`.
    pub fn compile(source: &str) -> Result<Self, FilterError> {
        if source.trim().is_empty() {
            return Err(invalid(
                "must not be empty (leave it out to deliver every message)",
            ));
        }
        if source.chars().count() > MAX_FILTER_CHARS {
            return Err(invalid(format!(
                "must be at most {MAX_FILTER_CHARS} characters"
            )));
        }
        // The parser is generated code; a panic in it must not take the reconcile down.
        let parsed = std::panic::catch_unwind(|| Program::compile(source))
            .map_err(|_| invalid("cannot be parsed"))?;
        let program = parsed.map_err(|errors| {
            invalid(format!("syntax error: {}", first_line(&errors.to_string())))
        })?;
        check_references(program.expression())?;
        let filter = Self {
            source: source.into(),
            program: Arc::new(program),
        };
        filter.check_against_sample()?;
        Ok(filter)
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the expression reads `message.categories`, which polls then select from Graph.
    pub fn reads_categories(&self) -> bool {
        let mut stack = vec![self.program.expression()];
        while let Some(node) = stack.pop() {
            if let Expr::Select(select) = &node.expr
                && select.field == "categories"
                && matches!(&select.operand.expr, Expr::Ident(name) if name == MESSAGE)
            {
                return true;
            }
            stack.extend(children(node));
        }
        false
    }

    /// Decides whether `message` is delivered.
    pub fn verdict(&self, message: &LedgerMessage) -> Verdict {
        match self.evaluate(message_value(message)) {
            Ok(Value::Bool(true)) => Verdict::Deliver,
            Ok(Value::Bool(false)) => Verdict::Filtered("spec.filter did not match".into()),
            Ok(other) => Verdict::Undecided(format!(
                "spec.filter returned {} instead of a bool",
                other.type_of()
            )),
            Err(error) => Verdict::Undecided(format!("spec.filter failed: {error}")),
        }
    }

    fn evaluate(&self, message: Value) -> Result<Value, ExecutionError> {
        let mut context = Context::default();
        context.add_variable_from_value(MESSAGE, message);
        self.program.execute(&context)
    }

    /// Type errors and non-boolean results, found by running the filter on a message with
    /// every field set. Errors that depend on the data (an index past the end, a failing
    /// conversion) are left to delivery time, where they deliver the message.
    fn check_against_sample(&self) -> Result<(), FilterError> {
        match self.evaluate(message_value(&sample_message())) {
            Ok(Value::Bool(_)) => Ok(()),
            Ok(other) => Err(invalid(format!(
                "must evaluate to a bool (true delivers the message), not a {}",
                other.type_of()
            ))),
            Err(error) if is_type_error(&error) => Err(invalid(error.to_string())),
            Err(_) => Ok(()),
        }
    }
}

/// The first line of a parser message (the rest is a caret drawing).
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

fn is_type_error(error: &ExecutionError) -> bool {
    matches!(
        error,
        ExecutionError::InvalidArgumentCount { .. }
            | ExecutionError::UnsupportedTargetType { .. }
            | ExecutionError::NotSupportedAsMethod { .. }
            | ExecutionError::UnexpectedType { .. }
            | ExecutionError::NoSuchKey(_)
            | ExecutionError::NoSuchOverload
            | ExecutionError::UndeclaredReference(_)
            | ExecutionError::ValuesNotComparable(..)
            | ExecutionError::UnsupportedUnaryOperator(..)
            | ExecutionError::UnsupportedBinaryOperator(..)
            | ExecutionError::UnsupportedMapIndex(_)
            | ExecutionError::UnsupportedListIndex(_)
            | ExecutionError::UnsupportedIndex(..)
    )
}

/// Unknown variables anywhere, and unknown fields of `message` and of its address objects.
fn check_references(root: &IdedExpr) -> Result<(), FilterError> {
    let mut bound = HashSet::new();
    collect_bound(root, &mut bound);
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        match &node.expr {
            Expr::Ident(name) if name != MESSAGE && !bound.contains(name.as_str()) => {
                return Err(invalid(format!(
                    "unknown variable {name:?}: the filter sees one variable, message (such as message.from.address)"
                )));
            }
            Expr::Select(select) => {
                check_field(&select.operand.expr, &select.field)?;
                stack.push(&select.operand);
            }
            _ => stack.extend(children(node)),
        }
    }
    Ok(())
}

/// Checks `operand.field` where the operand is `message` or `message.from`/`message.sender`.
fn check_field(operand: &Expr, field: &str) -> Result<(), FilterError> {
    match operand {
        Expr::Ident(name) if name == MESSAGE && !MESSAGE_FIELDS.contains(&field) => {
            Err(invalid(format!(
                "message has no field {field:?}; its fields are {}",
                MESSAGE_FIELDS.join(", ")
            )))
        }
        Expr::Select(inner)
            if matches!(&inner.operand.expr, Expr::Ident(name) if name == MESSAGE)
                && ADDRESS_OBJECTS.contains(&inner.field.as_str())
                && !ADDRESS_FIELDS.contains(&field) =>
        {
            Err(invalid(format!(
                "message.{} has no field {field:?}; an address has address and name",
                inner.field
            )))
        }
        _ => Ok(()),
    }
}

/// Names bound by comprehensions (`exists(r, ...)` binds `r`, macros bind an accumulator).
fn collect_bound<'a>(root: &'a IdedExpr, bound: &mut HashSet<&'a str>) {
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if let Expr::Comprehension(comprehension) = &node.expr {
            bound.insert(comprehension.iter_var.as_str());
            bound.insert(comprehension.accu_var.as_str());
            if let Some(second) = &comprehension.iter_var2 {
                bound.insert(second.as_str());
            }
        }
        stack.extend(children(node));
    }
}

fn children(node: &IdedExpr) -> Vec<&IdedExpr> {
    match &node.expr {
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| t.as_ref())
            .chain(&call.args)
            .collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(map) => entries(&map.entries),
        Expr::Struct(fields) => entries(&fields.entries),
        Expr::Select(select) => vec![&select.operand],
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => Vec::new(),
    }
}

fn entries(entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<&IdedExpr> {
    entries
        .iter()
        .flat_map(|entry| match &entry.expr {
            EntryExpr::StructField(field) => vec![&field.value],
            EntryExpr::MapEntry(pair) => vec![&pair.key, &pair.value],
        })
        .collect()
}

/// The `message` variable of a ledger message. Missing text reads as "", missing flags as
/// false and missing lists as []: a filter on the sender does not fail on a message without
/// one. Addresses and importance are lower-cased, so comparisons ignore case as Outlook does.
/// The received and sent times are timestamps (absent when Graph sent none).
pub fn message_value(message: &LedgerMessage) -> Value {
    let text = |value: &Option<String>| Value::from(value.clone().unwrap_or_default());
    let mut fields: HashMap<Key, Value> = HashMap::from([
        ("id".into(), Value::from(message.message_id.clone())),
        (
            "internetMessageId".into(),
            text(&message.internet_message_id),
        ),
        ("conversationId".into(), text(&message.conversation_id)),
        ("subject".into(), text(&message.subject)),
        ("bodyPreview".into(), text(&message.body_preview)),
        (
            "importance".into(),
            Value::from(lower(message.importance.as_deref())),
        ),
        (
            "isRead".into(),
            Value::Bool(message.is_read.unwrap_or(false)),
        ),
        (
            "hasAttachments".into(),
            Value::Bool(message.has_attachments.unwrap_or(false)),
        ),
        ("categories".into(), categories(&message.raw)),
        (
            "from".into(),
            address(
                message.from_address.as_deref(),
                message.from_name.as_deref(),
            ),
        ),
        (
            "sender".into(),
            address(
                message.sender_address.as_deref(),
                message.sender_name.as_deref(),
            ),
        ),
        ("toRecipients".into(), recipients(&message.to_recipients)),
        ("ccRecipients".into(), recipients(&message.cc_recipients)),
        ("replyTo".into(), recipients(&message.reply_to)),
    ]);
    for (name, time) in [
        ("receivedDateTime", message.received_at),
        ("sentDateTime", message.sent_at),
    ] {
        if let Some(time) = time {
            fields.insert(name.into(), timestamp(time));
        }
    }
    Value::Map(fields.into())
}

fn lower(text: Option<&str>) -> String {
    text.unwrap_or_default().to_lowercase()
}

fn address(address: Option<&str>, name: Option<&str>) -> Value {
    Value::Map(
        HashMap::<Key, Value>::from([
            ("address".into(), Value::from(lower(address))),
            ("name".into(), Value::from(name.unwrap_or_default())),
        ])
        .into(),
    )
}

/// `[{"name": .., "address": ..}]` as the ledger keeps recipients.
fn recipients(list: &serde_json::Value) -> Value {
    fn field<'a>(entry: &'a serde_json::Value, key: &str) -> Option<&'a str> {
        entry.get(key).and_then(|v| v.as_str())
    }
    let entries: Vec<Value> = list
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|entry| address(field(entry, "address"), field(entry, "name")))
                .collect()
        })
        .unwrap_or_default();
    Value::List(Arc::new(entries))
}

/// Graph's `categories` (strings), when the round selected them.
fn categories(raw: &serde_json::Value) -> Value {
    let names: Vec<Value> = raw
        .get("categories")
        .and_then(|c| c.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|c| c.as_str())
                .map(Value::from)
                .collect()
        })
        .unwrap_or_default();
    Value::List(Arc::new(names))
}

fn timestamp(time: DateTime<Utc>) -> Value {
    Value::Timestamp(time.fixed_offset())
}

/// A message with every field set, to type-check filters against.
fn sample_message() -> LedgerMessage {
    let someone = serde_json::json!([{"name": "Someone", "address": "someone@contoso.com"}]);
    LedgerMessage {
        message_id: "AAMk-sample".into(),
        internet_message_id: Some("<sample@contoso.com>".into()),
        subject: Some("Invoice 42".into()),
        from_address: Some("billing@contoso.com".into()),
        from_name: Some("Billing".into()),
        sender_address: Some("billing@contoso.com".into()),
        sender_name: Some("Billing".into()),
        to_recipients: someone.clone(),
        cc_recipients: someone.clone(),
        reply_to: someone,
        received_at: Some(DateTime::UNIX_EPOCH),
        sent_at: Some(DateTime::UNIX_EPOCH),
        is_read: Some(false),
        has_attachments: Some(true),
        importance: Some("normal".into()),
        conversation_id: Some("AAQk-sample".into()),
        body_preview: Some("Please find attached".into()),
        raw: serde_json::json!({"categories": ["Finance"]}),
        ..LedgerMessage::default()
    }
}

#[cfg(test)]
mod tests;
