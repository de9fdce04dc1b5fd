//! Patches and field ownership: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and
//! server-side apply with `managedFields` (field sets per manager, conflicts, forced takeover,
//! list merging by `x-kubernetes-list-type`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::resource::{ListType, ResourceType};
use super::status::ApiError;

/// One step of a field path, as `managedFields` spells it (`f:`, `k:`, `v:`, `i:`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathElement {
    Field(String),
    /// An item of a map-list, by its key fields (canonical JSON object).
    Key(String),
    /// An item of a set-list, by its value (JSON).
    Value(String),
    Index(usize),
}

pub type FieldPath = Vec<PathElement>;
pub type FieldSet = BTreeSet<FieldPath>;

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (a resource without a status subresource).
    All,
    /// Everything but `status` (the main resource when a status subresource exists).
    Main,
    /// Only `status` (the status subresource).
    Status,
}

impl Scope {
    pub fn subresource(self) -> Option<&'static str> {
        (self == Scope::Status).then_some("status")
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl ManagedEntry {
    fn same_owner(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }
}

const SERVER_METADATA: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

fn key_of(item: &Value, keys: &[String]) -> Option<String> {
    let mut map = BTreeMap::new();
    for key in keys {
        map.insert(key.clone(), item.get(key)?.clone());
    }
    serde_json::to_string(&map).ok()
}

/// The fields `value` sets within `scope`: leaves, map-list items and set-list values.
pub fn field_set(rt: &ResourceType, value: &Value, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = value.as_object() else {
        return out;
    };
    for (key, child) in map {
        let skip = match key.as_str() {
            "apiVersion" | "kind" => true,
            "status" => scope == Scope::Main,
            _ => scope == Scope::Status,
        };
        if skip {
            continue;
        }
        collect(
            rt,
            child,
            &mut vec![key.clone()],
            &mut vec![PathElement::Field(key.clone())],
            &mut out,
        );
    }
    out
}

fn collect(
    rt: &ResourceType,
    value: &Value,
    names: &mut Vec<String>,
    path: &mut FieldPath,
    out: &mut FieldSet,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let is_metadata = names.len() == 1 && names[0] == "metadata";
            for (key, child) in map {
                if is_metadata && SERVER_METADATA.contains(&key.as_str()) {
                    continue;
                }
                names.push(key.clone());
                path.push(PathElement::Field(key.clone()));
                collect(rt, child, names, path, out);
                path.pop();
                names.pop();
            }
        }
        Value::Array(items) => match rt.list_type(names) {
            ListType::Map(keys) => {
                let item_keys: Option<Vec<String>> =
                    items.iter().map(|item| key_of(item, &keys)).collect();
                let Some(item_keys) = item_keys else {
                    out.insert(path.clone());
                    return;
                };
                for (item, key) in items.iter().zip(item_keys) {
                    path.push(PathElement::Key(key));
                    out.insert(path.clone());
                    if let Some(fields) = item.as_object() {
                        for (field, child) in fields {
                            names.push(field.clone());
                            path.push(PathElement::Field(field.clone()));
                            collect(rt, child, names, path, out);
                            path.pop();
                            names.pop();
                        }
                    }
                    path.pop();
                }
            }
            ListType::Set => {
                for item in items {
                    path.push(PathElement::Value(item.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Atomic => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path`, if present.
pub fn get_at<'a>(root: &'a Value, path: &[PathElement]) -> Option<&'a Value> {
    let mut node = root;
    for step in path {
        node = match step {
            PathElement::Field(name) => node.get(name)?,
            PathElement::Index(i) => node.get(*i)?,
            PathElement::Key(key) => {
                let wanted: Map<String, Value> = serde_json::from_str(key).ok()?;
                node.as_array()?
                    .iter()
                    .find(|item| wanted.iter().all(|(k, v)| item.get(k) == Some(v)))?
            }
            PathElement::Value(text) => {
                let wanted: Value = serde_json::from_str(text).ok()?;
                node.as_array()?.iter().find(|item| **item == wanted)?
            }
        };
    }
    Some(node)
}

fn remove_at(root: &mut Value, path: &[PathElement]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut node = root;
    for step in parent_path {
        let next = match step {
            PathElement::Field(name) => node.get_mut(name),
            PathElement::Index(i) => node.get_mut(*i),
            PathElement::Key(_) | PathElement::Value(_) => {
                let Some(found) = get_at(node, std::slice::from_ref(step)).cloned() else {
                    return;
                };
                node.as_array_mut()
                    .and_then(|items| items.iter_mut().find(|item| **item == found))
            }
        };
        match next {
            Some(next) => node = next,
            None => return,
        }
    }
    match last {
        PathElement::Field(name) => {
            if let Some(map) = node.as_object_mut() {
                map.remove(name);
            }
        }
        PathElement::Index(i) => {
            if let Some(items) = node.as_array_mut()
                && *i < items.len()
            {
                items.remove(*i);
            }
        }
        PathElement::Key(_) | PathElement::Value(_) => {
            let Some(found) = get_at(node, std::slice::from_ref(last)).cloned() else {
                return;
            };
            if let Some(items) = node.as_array_mut() {
                items.retain(|item| *item != found);
            }
        }
    }
}

/// A path as conflict messages print it: `.spec.interval`, `.status.conditions[type="Ready"]`.
pub fn render_path(path: &[PathElement]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            PathElement::Field(name) => {
                out.push('.');
                out.push_str(name);
            }
            PathElement::Index(i) => out.push_str(&format!("[{i}]")),
            PathElement::Value(v) => out.push_str(&format!("[={v}]")),
            PathElement::Key(key) => {
                let map: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
                let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push_str(&format!("[{}]", parts.join(",")));
            }
        }
    }
    out
}

/// Reads `metadata.managedFields`.
pub fn parse_managed(object: &Value) -> Vec<ManagedEntry> {
    let Some(entries) = object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|entry| {
            let text = |k: &str| {
                entry
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let mut fields = FieldSet::new();
            if let Some(tree) = entry.get("fieldsV1") {
                parse_tree(tree, &mut Vec::new(), &mut fields);
            }
            ManagedEntry {
                manager: text("manager"),
                operation: text("operation"),
                api_version: text("apiVersion"),
                time: text("time"),
                subresource: entry
                    .get("subresource")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                fields,
            }
        })
        .collect()
}

fn parse_tree(node: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    let Some(map) = node.as_object() else {
        return;
    };
    if !path.is_empty() && (map.is_empty() || map.contains_key(".")) {
        out.insert(path.clone());
    }
    for (key, child) in map {
        let step = if let Some(name) = key.strip_prefix("f:") {
            PathElement::Field(name.to_owned())
        } else if let Some(k) = key.strip_prefix("k:") {
            let canonical: Option<BTreeMap<String, Value>> = serde_json::from_str(k).ok();
            match canonical.and_then(|c| serde_json::to_string(&c).ok()) {
                Some(c) => PathElement::Key(c),
                None => continue,
            }
        } else if let Some(v) = key.strip_prefix("v:") {
            PathElement::Value(v.to_owned())
        } else if let Some(i) = key.strip_prefix("i:").and_then(|i| i.parse().ok()) {
            PathElement::Index(i)
        } else {
            continue;
        };
        path.push(step);
        parse_tree(child, path, out);
        path.pop();
    }
}

fn element_key(step: &PathElement) -> String {
    match step {
        PathElement::Field(name) => format!("f:{name}"),
        PathElement::Key(key) => format!("k:{key}"),
        PathElement::Value(value) => format!("v:{value}"),
        PathElement::Index(i) => format!("i:{i}"),
    }
}

fn render_tree(fields: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for step in path {
            let entry = node
                .entry(element_key(step))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else {
                break;
            };
            node = next;
        }
    }
    mark_members(&mut root, &mut Vec::new(), fields);
    Value::Object(root)
}

/// Adds `"."` to the nodes that are members and also have children.
fn mark_members(node: &mut Map<String, Value>, path: &mut Vec<String>, fields: &FieldSet) {
    let keys: Vec<String> = node.keys().cloned().collect();
    for key in keys {
        path.push(key.clone());
        if let Some(Value::Object(child)) = node.get_mut(&key)
            && !child.is_empty()
        {
            let is_member = fields.iter().any(|p| {
                p.len() == path.len()
                    && p.iter().zip(path.iter()).all(|(s, k)| element_key(s) == *k)
            });
            mark_members(child, path, fields);
            if is_member {
                child.insert(".".into(), json!({}));
            }
        }
        path.pop();
    }
}

/// Writes `metadata.managedFields`.
pub fn render_managed(object: &mut Value, entries: &[ManagedEntry]) {
    let rendered: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut entry = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": render_tree(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                entry["subresource"] = json!(sub);
            }
            entry
        })
        .collect();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if rendered.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(rendered));
        }
    }
}

fn is_structural(path: &[PathElement]) -> bool {
    matches!(
        path.last(),
        Some(PathElement::Key(_) | PathElement::Value(_))
    )
}

/// Who wrote what, for one write.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub time: &'a str,
    pub scope: Scope,
}

/// Records an Update-operation write from `old` to `new` in `new`'s managedFields: the changed
/// fields move to the writer, removed fields leave every manager.
pub fn track_update(rt: &ResourceType, old: Option<&Value>, new: &mut Value, writer: &Writer) {
    let mut entries = old.map(parse_managed).unwrap_or_default();
    let empty = json!({});
    let old_value = old.unwrap_or(&empty);
    let new_set = field_set(rt, new, writer.scope);
    let old_set = field_set(rt, old_value, writer.scope);
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| {
            let before = get_at(old_value, p);
            if is_structural(p) {
                before.is_none()
            } else {
                before != get_at(new, p)
            }
        })
        .cloned()
        .collect();
    let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
    let sub = writer.scope.subresource();
    for entry in &mut entries {
        let mine = entry.same_owner(writer.manager, "Update", sub);
        entry.fields.retain(|p| {
            !removed.iter().any(|r| p.starts_with(r)) && (mine || !changed.contains(p))
        });
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.same_owner(writer.manager, "Update", sub))
        {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.time = writer.time.to_owned();
                entry.api_version = writer.api_version.to_owned();
            }
            None => entries.push(ManagedEntry {
                manager: writer.manager.to_owned(),
                operation: "Update".into(),
                api_version: writer.api_version.to_owned(),
                time: writer.time.to_owned(),
                subresource: sub.map(str::to_owned),
                fields: changed,
            }),
        }
    }
    entries.retain(|e| !e.fields.is_empty());
    render_managed(new, &entries);
}

/// Merges an applied configuration into `live` the way server-side apply does.
fn merge(rt: &ResourceType, live: &Value, applied: &Value, names: &mut Vec<String>) -> Value {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            let mut result = l.clone();
            for (key, av) in a {
                names.push(key.clone());
                let merged = match l.get(key) {
                    Some(lv) => merge(rt, lv, av, names),
                    None => av.clone(),
                };
                names.pop();
                result.insert(key.clone(), merged);
            }
            Value::Object(result)
        }
        (Value::Array(l), Value::Array(a)) => match rt.list_type(names) {
            ListType::Map(keys) => {
                let mut result = l.clone();
                for item in a {
                    let key = key_of(item, &keys);
                    let position = key.as_ref().and_then(|k| {
                        result
                            .iter()
                            .position(|existing| key_of(existing, &keys).as_ref() == Some(k))
                    });
                    match position {
                        Some(i) => {
                            let merged = merge(rt, &result[i], item, names);
                            result[i] = merged;
                        }
                        None => result.push(item.clone()),
                    }
                }
                Value::Array(result)
            }
            ListType::Set => {
                let mut result = l.clone();
                for item in a {
                    if !result.contains(item) {
                        result.push(item.clone());
                    }
                }
                Value::Array(result)
            }
            ListType::Atomic => applied.clone(),
        },
        _ => applied.clone(),
    }
}

/// The outcome of a server-side apply: the new object, with managedFields updated.
pub fn apply(
    rt: &ResourceType,
    live: &Value,
    applied: &Value,
    writer: &Writer,
    force: bool,
) -> Result<Value, ApiError> {
    let sub = writer.scope.subresource();
    let mut entries = parse_managed(live);
    let applied_set = field_set(rt, applied, writer.scope);
    let previous: FieldSet = entries
        .iter()
        .find(|e| e.same_owner(writer.manager, "Apply", sub))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut conflicts = Vec::new();
    let mut conflicting = FieldSet::new();
    for path in applied_set.iter().filter(|p| !is_structural(p)) {
        let current = get_at(live, path);
        if current.is_none() || current == get_at(applied, path) {
            continue;
        }
        for entry in &entries {
            if entry.same_owner(writer.manager, "Apply", sub) || !entry.fields.contains(path) {
                continue;
            }
            conflicts.push((
                entry.manager.clone(),
                entry.api_version.clone(),
                render_path(path),
            ));
            conflicting.insert(path.clone());
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(ApiError::apply_conflicts(&conflicts));
    }
    let mut scoped_applied = applied.clone();
    if let Some(map) = scoped_applied.as_object_mut() {
        map.retain(|key, _| match key.as_str() {
            "apiVersion" | "kind" => false,
            "status" => writer.scope != Scope::Main,
            "metadata" => true,
            _ => writer.scope != Scope::Status,
        });
        if writer.scope == Scope::Status {
            map.remove("metadata");
        } else if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for key in SERVER_METADATA {
                meta.remove(key);
            }
        }
    }
    let mut merged = merge(rt, live, &scoped_applied, &mut Vec::new());
    for entry in &mut entries {
        if !entry.same_owner(writer.manager, "Apply", sub) {
            entry.fields.retain(|p| !conflicting.contains(p));
        }
    }
    let others: FieldSet = entries
        .iter()
        .filter(|e| !e.same_owner(writer.manager, "Apply", sub))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let dropped: Vec<&FieldPath> = previous
        .difference(&applied_set)
        .filter(|p| !others.iter().any(|o| o.starts_with(p)))
        .collect();
    // An item that goes takes its fields with it; removing them first would lose its key.
    for path in &dropped {
        let inside_dropped = dropped
            .iter()
            .any(|other| other.len() < path.len() && path.starts_with(other));
        if !inside_dropped {
            remove_at(&mut merged, path);
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.same_owner(writer.manager, "Apply", sub))
    {
        Some(entry) => {
            entry.fields = applied_set;
            entry.time = writer.time.to_owned();
            entry.api_version = writer.api_version.to_owned();
        }
        None => entries.push(ManagedEntry {
            manager: writer.manager.to_owned(),
            operation: "Apply".into(),
            api_version: writer.api_version.to_owned(),
            time: writer.time.to_owned(),
            subresource: sub.map(str::to_owned),
            fields: applied_set,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
    render_managed(&mut merged, &entries);
    Ok(merged)
}

/// RFC 6902: a failed `test` or a missing path is 422, a malformed patch 400.
pub fn json_patch(target: &Value, body: &Value) -> Result<Value, ApiError> {
    let operations: json_patch::Patch = serde_json::from_value(body.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    let mut patched = target.clone();
    json_patch::patch(&mut patched, &operations).map_err(|e| match e.kind {
        json_patch::PatchErrorKind::TestFailed => ApiError::unprocessable(format!(
            "the server rejected our request due to an error in our request: testing value {} failed: {e}",
            e.path
        )),
        _ => ApiError::unprocessable(format!(
            "the server rejected our request due to an error in our request: {e}"
        )),
    })?;
    Ok(patched)
}

/// RFC 7386.
pub fn merge_patch(target: &Value, body: &Value) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "error decoding patch: a merge patch must be a JSON object",
        ));
    }
    let mut patched = target.clone();
    json_patch::merge(&mut patched, body);
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::crd::served_types;

    fn mailboxpoll() -> ResourceType {
        let crd = serde_json::to_value(
            <mailpoll::resource::MailboxPoll as kube::CustomResourceExt>::crd(),
        )
        .expect("crd serializes");
        served_types(&crd).expect("valid").remove(0)
    }

    fn writer(manager: &str, scope: Scope) -> Writer<'_> {
        Writer {
            manager,
            api_version: "mailpoll.dev/v1alpha1",
            time: "2026-01-01T00:00:00Z",
            scope,
        }
    }

    fn condition(kind: &str, status: &str) -> Value {
        json!({"type": kind, "status": status, "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn managers_share_conditions_keyed_by_type() {
        let rt = mailboxpoll();
        let live = json!({"metadata": {"name": "a"}, "spec": {"mailbox": "x"}});
        let first = apply(
            &rt,
            &live,
            &json!({"status": {"conditions": [condition("Ready", "True")]}}),
            &writer("scheduler", Scope::Status),
            false,
        )
        .expect("first apply");
        let second = apply(
            &rt,
            &first,
            &json!({"status": {"conditions": [condition("Degraded", "False")]}}),
            &writer("worker", Scope::Status),
            false,
        )
        .expect("second apply");
        let types: Vec<&str> = second["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, ["Ready", "Degraded"]);
        // The first manager dropping its condition removes only its own.
        let third = apply(
            &rt,
            &second,
            &json!({"status": {}}),
            &writer("scheduler", Scope::Status),
            false,
        )
        .expect("third apply");
        assert_eq!(
            third["status"]["conditions"],
            json!([condition("Degraded", "False")])
        );
    }

    #[test]
    fn conflicting_values_need_force() {
        let rt = mailboxpoll();
        let live = json!({"metadata": {"name": "a"}});
        let a = apply(
            &rt,
            &live,
            &json!({"spec": {"interval": "5m"}}),
            &writer("a", Scope::Main),
            false,
        )
        .expect("a applies");
        let error = apply(
            &rt,
            &a,
            &json!({"spec": {"interval": "1m"}}),
            &writer("b", Scope::Main),
            false,
        )
        .expect_err("conflict");
        assert_eq!(error.code, 409);
        assert!(
            error.message.contains("conflict with \"a\""),
            "{}",
            error.message
        );
        assert!(
            error.message.contains(".spec.interval"),
            "{}",
            error.message
        );
        // The same value is no conflict: ownership is shared.
        apply(
            &rt,
            &a,
            &json!({"spec": {"interval": "5m"}}),
            &writer("b", Scope::Main),
            false,
        )
        .expect("same value");
        let forced = apply(
            &rt,
            &a,
            &json!({"spec": {"interval": "1m"}}),
            &writer("b", Scope::Main),
            true,
        )
        .expect("forced");
        assert_eq!(forced["spec"]["interval"], "1m");
        let entries = parse_managed(&forced);
        let a_entry = entries.iter().find(|e| e.manager == "a");
        assert!(a_entry.is_none(), "a lost its only field: {entries:?}");
    }

    #[test]
    fn managed_fields_round_trip() {
        let rt = mailboxpoll();
        let object = json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"mailbox": "m"},
                            "status": {"conditions": [condition("Ready", "True")]}});
        let fields = field_set(&rt, &object, Scope::All);
        let mut rendered = object.clone();
        render_managed(
            &mut rendered,
            &[ManagedEntry {
                manager: "m".into(),
                operation: "Update".into(),
                api_version: "v".into(),
                time: "t".into(),
                subresource: None,
                fields: fields.clone(),
            }],
        );
        let tree = &rendered["metadata"]["managedFields"][0]["fieldsV1"];
        assert_eq!(
            tree["f:status"]["f:conditions"]["k:{\"type\":\"Ready\"}"]["."],
            json!({})
        );
        assert_eq!(tree["f:metadata"]["f:labels"]["f:x"], json!({}));
        assert_eq!(parse_managed(&rendered)[0].fields, fields);
    }

    #[test]
    fn updates_move_ownership_to_the_writer() {
        let rt = mailboxpoll();
        let mut created =
            json!({"metadata": {"name": "a"}, "spec": {"mailbox": "m", "interval": "5m"}});
        track_update(&rt, None, &mut created, &writer("creator", Scope::Main));
        let mut updated = created.clone();
        updated["spec"]["interval"] = json!("1m");
        track_update(
            &rt,
            Some(&created),
            &mut updated,
            &writer("editor", Scope::Main),
        );
        let entries = parse_managed(&updated);
        let owner = |path: &str| {
            entries
                .iter()
                .filter(|e| e.fields.iter().any(|p| render_path(p) == path))
                .map(|e| e.manager.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(owner(".spec.interval"), ["editor"]);
        assert_eq!(owner(".spec.mailbox"), ["creator"]);
    }

    /// What the operator's status writer relies on: its forced apply takes over what an older
    /// release's merge patch (an Update by the same manager name) wrote, a field it stops
    /// applying goes away, and another manager's condition stays.
    #[test]
    fn a_status_applier_takes_over_updates_and_removes_what_it_stops_applying() {
        let rt = mailboxpoll();
        let live = json!({"metadata": {"name": "a"}, "spec": {"mailbox": "m"}});
        let mut merged = live.clone();
        merged["status"] = json!({"nextPollTime": "2026-01-01T00:01:00Z", "messagesPending": 1});
        track_update(
            &rt,
            Some(&live),
            &mut merged,
            &writer("mailpoll-controller", Scope::Status),
        );
        let status = |pending: i64, next: Option<&str>| {
            let mut status =
                json!({"messagesPending": pending, "conditions": [condition("Ready", "True")]});
            if let Some(next) = next {
                status["nextPollTime"] = json!(next);
            }
            json!({"status": status})
        };
        let applier = writer("mailpoll-controller", Scope::Status);
        let unforced = apply(&rt, &merged, &status(2, None), &applier, false);
        assert!(
            unforced.is_err(),
            "the Update's fields belong to another manager entry: only a forced apply takes them"
        );
        let first = apply(
            &rt,
            &merged,
            &status(2, Some("2026-01-01T00:02:00Z")),
            &applier,
            true,
        )
        .expect("forced apply");
        assert_eq!(first["status"]["messagesPending"], json!(2));
        let managers: Vec<(String, String)> = parse_managed(&first)
            .into_iter()
            .map(|e| (e.manager, e.operation))
            .collect();
        assert_eq!(
            managers,
            [("mailpoll-controller".to_owned(), "Apply".to_owned())],
            "every field moved to the applier"
        );
        let other = apply(
            &rt,
            &first,
            &json!({"status": {"conditions": [condition("Synced", "True")]}}),
            &writer("someone-else", Scope::Status),
            false,
        )
        .expect("another manager's condition");
        let second = apply(&rt, &other, &status(0, None), &applier, true).expect("apply again");
        assert!(
            second["status"].get("nextPollTime").is_none(),
            "a field no longer applied is removed: {}",
            second["status"]
        );
        let types: Vec<&str> = second["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, ["Ready", "Synced"]);
        let again = apply(&rt, &second, &status(0, None), &applier, true).expect("no-op");
        assert_eq!(
            again["status"], second["status"],
            "the same apply changes nothing"
        );
    }

    #[test]
    fn json_patch_test_failure_is_unprocessable() {
        let target = json!({"spec": {"mailbox": "a"}});
        let error = json_patch(
            &target,
            &json!([{"op": "test", "path": "/spec/mailbox", "value": "b"}]),
        )
        .expect_err("test fails");
        assert_eq!(error.code, 422);
        let error = json_patch(&target, &json!({"op": "add"})).expect_err("malformed");
        assert_eq!(error.code, 400);
        let patched = json_patch(
            &target,
            &json!([{"op": "replace", "path": "/spec/mailbox", "value": "b"}]),
        )
        .expect("replace works");
        assert_eq!(patched["spec"]["mailbox"], "b");
    }
}
