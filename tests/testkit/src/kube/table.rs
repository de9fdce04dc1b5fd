//! `meta.k8s.io/v1` Table output, which `kubectl get` asks for: the Name column, the printer
//! columns (JSONPath for CRDs), ages rendered as kubectl shows them.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::resource::{CellSource, ResourceType};

/// How much of each object a Table row carries (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// Whether an Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// `rt`'s objects as a Table.
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    resource_version: &str,
    include: IncludeObject,
) -> Value {
    let mut columns = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace.",
    })];
    for column in &rt.columns {
        let kind = column.kind.as_str();
        columns.push(json!({
            "name": column.name, "type": kind, "format": column.format,
            "description": column.description, "priority": column.priority,
        }));
    }
    let rows: Vec<Value> = objects.iter().map(|o| row(rt, o, include)).collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn row(rt: &ResourceType, object: &Value, include: IncludeObject) -> Value {
    let mut cells = vec![
        object
            .pointer("/metadata/name")
            .cloned()
            .unwrap_or(Value::Null),
    ];
    for column in &rt.columns {
        let cell = match &column.source {
            CellSource::Computed(f) => f(object),
            CellSource::JsonPath(path) => {
                let found = eval(object, path).into_iter().next();
                match found {
                    Some(value) if column.kind == "date" => age_cell(Some(&value)),
                    Some(value) => value,
                    None => Value::Null,
                }
            }
        };
        cells.push(cell);
    }
    let mut row = json!({"cells": cells});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object.get("metadata").cloned().unwrap_or(json!({})),
            });
        }
        IncludeObject::Object => row["object"] = object.clone(),
    }
    row
}

/// A timestamp as the age kubectl prints (`5s`, `3m20s`, `2d`); `<unknown>` when absent.
pub fn age_cell(value: Option<&Value>) -> Value {
    let Some(stamp) = value.and_then(Value::as_str) else {
        return json!("<unknown>");
    };
    match DateTime::parse_from_rfc3339(stamp) {
        Ok(time) => {
            let seconds = (Utc::now() - time.with_timezone(&Utc)).num_seconds();
            json!(human_duration(seconds))
        }
        Err(_) => json!("<invalid>"),
    }
}

/// kubectl's `HumanDuration`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let seconds = seconds.max(0);
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    let years = days / 365;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if days < 365 * 8 {
        match days % 365 {
            0 => format!("{years}y"),
            d => format!("{years}y{d}d"),
        }
    } else {
        format!("{years}y")
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `[n]`, `[*]` and
/// `[?(@.field=="value")]` filters. Returns every match.
pub fn eval(root: &Value, path: &str) -> Vec<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut current = vec![root.clone()];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let key = &after[..end];
            rest = &after[end..];
            if key.is_empty() {
                continue;
            }
            current = current.iter().filter_map(|v| v.get(key).cloned()).collect();
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return Vec::new();
            };
            let selector = &after[..end];
            rest = &after[end + 1..];
            current = apply_selector(&current, selector);
        } else {
            return Vec::new();
        }
    }
    current
}

fn apply_selector(current: &[Value], selector: &str) -> Vec<Value> {
    let items = current.iter().filter_map(Value::as_array).flatten();
    if selector == "*" {
        return items.cloned().collect();
    }
    if let Ok(index) = selector.parse::<usize>() {
        return current
            .iter()
            .filter_map(|v| v.get(index).cloned())
            .collect();
    }
    let Some(filter) = selector
        .strip_prefix("?(")
        .and_then(|s| s.strip_suffix(')'))
    else {
        return Vec::new();
    };
    let (lhs, rhs, equal) = if let Some((l, r)) = filter.split_once("!=") {
        (l, r, false)
    } else if let Some((l, r)) = filter.split_once("==") {
        (l, r, true)
    } else {
        return Vec::new();
    };
    let field = lhs.trim().trim_start_matches('@');
    let expected = rhs.trim().trim_matches(|c| c == '"' || c == '\'');
    items
        .filter(|item| {
            let found = eval(item, field).into_iter().next();
            let matches = match &found {
                Some(Value::String(s)) => s == expected,
                Some(other) => serde_json::to_string(other).is_ok_and(|text| text == expected),
                None => false,
            };
            matches == equal
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_filters_conditions_by_type() {
        let object = json!({"status": {"conditions": [
            {"type": "Degraded", "status": "True"},
            {"type": "Ready", "status": "False"}
        ]}, "spec": {"mailbox": "a@b.c"}});
        assert_eq!(
            eval(&object, ".status.conditions[?(@.type==\"Ready\")].status"),
            [json!("False")]
        );
        assert_eq!(eval(&object, ".spec.mailbox"), [json!("a@b.c")]);
        assert_eq!(
            eval(&object, ".status.conditions[0].type"),
            [json!("Degraded")]
        );
        assert!(eval(&object, ".status.missing").is_empty());
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(86400 * 3), "3d");
        assert_eq!(human_duration(-5), "<invalid>");
    }

    #[test]
    fn table_accept_is_recognised() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
