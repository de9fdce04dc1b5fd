//! Text from outside (Graph, receivers, the token endpoint) made storable before Postgres sees
//! it. Postgres `text` refuses U+0000 outright, `jsonb` refuses it and its `\u0000` escape, and
//! one refused value fails the whole statement it is in (a page of messages, a batch of task
//! results). So every outside string is cleaned here on its way to a table.
//!
//! The rule: NUL and the other C0 control characters (U+0001–U+001F) except tab, line feed and
//! carriage return, and DEL (U+007F), become U+FFFD (the replacement character). Only NUL is
//! refused by Postgres, but the others have no business in a subject, a name or an error text
//! either: they garble `kubectl describe` and logs (ESC starts terminal sequences), and a
//! receiver that stores the payload in Postgres meets the same refusal. Replacing rather than
//! deleting keeps the reader aware that something was there. C1 controls (U+0080–U+009F) are
//! valid text to Postgres and are left alone.

use std::borrow::Cow;

use serde_json::Value;

/// What a refused character becomes.
pub const REPLACEMENT: char = '\u{FFFD}';

/// Marks text that was cut at a length cap.
const CUT_MARK: &str = " [truncated]";

/// Whether `c` is replaced (see the module documentation).
fn refused(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}')
}

/// `text` with refused characters replaced and, when it is longer than `max_bytes`, cut on a
/// character boundary with a mark saying so (the result is at most `max_bytes` long, unless
/// `max_bytes` is smaller than the mark). Borrows when nothing changes.
pub fn text(text: &str, max_bytes: usize) -> Cow<'_, str> {
    let clean = text.len() <= max_bytes && !text.contains(refused);
    if clean {
        return Cow::Borrowed(text);
    }
    let budget = if text.len() > max_bytes {
        max_bytes.saturating_sub(CUT_MARK.len())
    } else {
        usize::MAX
    };
    let mut out = String::with_capacity(text.len().min(max_bytes));
    let mut cut = false;
    for c in text.chars() {
        let c = if refused(c) { REPLACEMENT } else { c };
        if out.len() + c.len_utf8() > budget {
            cut = true;
            break;
        }
        out.push(c);
    }
    if cut {
        out.push_str(CUT_MARK);
    }
    Cow::Owned(out)
}

/// [`text`] for an owned string, without a copy when nothing changes.
pub fn owned(value: String, max_bytes: usize) -> String {
    match text(&value, max_bytes) {
        Cow::Borrowed(_) => value,
        Cow::Owned(changed) => changed,
    }
}

/// [`owned`] without a length cap (message content: its size is bounded where it is read).
pub fn clean(value: String) -> String {
    owned(value, usize::MAX)
}

/// [`clean`] for an optional field.
pub fn clean_opt(value: Option<String>) -> Option<String> {
    value.map(clean)
}

/// Cleans every string of a JSON value in place, object keys included, at any depth.
pub fn clean_json(value: &mut Value) {
    match value {
        Value::String(s) => {
            if s.contains(refused) {
                *s = clean(std::mem::take(s));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(clean_json),
        Value::Object(map) => {
            if map.keys().any(|key| key.contains(refused)) {
                let entries = std::mem::take(map);
                for (key, mut item) in entries {
                    clean_json(&mut item);
                    map.insert(clean(key), item);
                }
            } else {
                map.values_mut().for_each(clean_json);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_and_c0_controls_are_replaced_but_tab_and_newlines_stay() {
        assert_eq!(
            text("a\0b\u{1}c\u{1b}[31m\u{7f}d\te\nf\rg", 100),
            "a\u{fffd}b\u{fffd}c\u{fffd}[31m\u{fffd}d\te\nf\rg"
        );
        assert!(matches!(text("plain é text", 100), Cow::Borrowed(_)));
        assert_eq!(text("\u{85}c1 stays", 100), "\u{85}c1 stays");
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_with_a_mark() {
        let long = "é".repeat(100);
        let cut = text(&long, 51);
        assert!(cut.len() <= 51, "{}", cut.len());
        assert!(cut.ends_with(CUT_MARK));
        assert!(cut.starts_with("éé"));
        assert_eq!(text("short", 5), "short");
        // A cap smaller than the mark still gives a mark, nothing more.
        assert_eq!(text("abcdef", 3), CUT_MARK);
    }

    #[test]
    fn json_strings_and_keys_are_cleaned_at_any_depth() {
        let mut value = json!({
            "subject": "a\u{0}b",
            "from": {"emailAddress": {"name": "x\u{0}", "address": "x@y"}},
            "list": ["ok", ["deep\u{0}"]],
            "k\u{0}ey": 1,
            "n": null,
        });
        clean_json(&mut value);
        assert_eq!(
            value,
            json!({
                "subject": "a\u{fffd}b",
                "from": {"emailAddress": {"name": "x\u{fffd}", "address": "x@y"}},
                "list": ["ok", ["deep\u{fffd}"]],
                "k\u{fffd}ey": 1,
                "n": null,
            })
        );
        assert!(!value.to_string().contains("\\u0000"));
    }

    #[test]
    fn owned_strings_are_kept_when_clean() {
        let s = String::from("fine");
        let ptr = s.as_ptr();
        let kept = owned(s, 10);
        assert_eq!(kept.as_ptr(), ptr);
        assert_eq!(clean_opt(Some("a\0".into())), Some("a\u{fffd}".into()));
    }
}
