//! CustomResourceDefinitions: checking a definition, the status a served definition gets
//! (Established, NamesAccepted), the resources it serves, and the pruning of unknown fields.

use std::sync::Arc;

use serde_json::{Value, json};

use super::resource::{CellSource, Column, ResourceType, StorageKey, View};
use super::status::ApiError;
use super::table;
use crate::crd_validation::{CrdValidator, FieldError, FieldErrorKind};

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn strings(value: &Value, pointer: &str) -> Vec<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn invalid(name: &str, errors: Vec<FieldError>) -> ApiError {
    ApiError::invalid(
        "apiextensions.k8s.io",
        "CustomResourceDefinition",
        name,
        &errors,
    )
}

fn field_error(field: &str, value: Option<&Value>, detail: &str) -> FieldError {
    FieldError {
        field: field.into(),
        kind: if value.is_some() {
            FieldErrorKind::Invalid
        } else {
            FieldErrorKind::Required
        },
        value: value.cloned(),
        detail: detail.into(),
    }
}

/// The resources `crd` serves, one per served version; 422 when the definition is unusable.
pub fn served_types(crd: &Value) -> Result<Vec<ResourceType>, ApiError> {
    let name = text(crd, "/metadata/name");
    let group = text(crd, "/spec/group");
    let plural = text(crd, "/spec/names/plural");
    let kind = text(crd, "/spec/names/kind");
    let mut errors = Vec::new();
    if group.is_empty() {
        errors.push(field_error("spec.group", None, ""));
    }
    if plural.is_empty() {
        errors.push(field_error("spec.names.plural", None, ""));
    }
    if kind.is_empty() {
        errors.push(field_error("spec.names.kind", None, ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errors.push(field_error(
            "metadata.name",
            Some(&json!(name)),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let scope = text(crd, "/spec/scope");
    if scope != "Namespaced" && scope != "Cluster" {
        errors.push(FieldError {
            field: "spec.scope".into(),
            kind: FieldErrorKind::Unsupported,
            value: Some(json!(scope)),
            detail: "supported values: \"Cluster\", \"Namespaced\"".into(),
        });
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push(field_error(
            "spec.versions",
            None,
            "must have exactly one version marked as storage version",
        ));
    }
    if !errors.is_empty() {
        return Err(invalid(name, errors));
    }
    let mut types = Vec::new();
    for (index, version) in versions.iter().enumerate() {
        if !version
            .get("served")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            continue;
        }
        let version_name = text(version, "/name");
        let schema = version.pointer("/schema/openAPIV3Schema").cloned();
        let validator = match &schema {
            Some(schema) => Some(Arc::new(
                CrdValidator::from_schema(schema.clone()).map_err(|e| {
                    invalid(
                        name,
                        vec![field_error(
                            &format!("spec.versions[{index}].schema.openAPIV3Schema"),
                            Some(&json!("")),
                            &e.to_string(),
                        )],
                    )
                })?,
            )),
            None => None,
        };
        let mut columns: Vec<Column> = version
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|columns| {
                columns
                    .iter()
                    .map(|c| Column {
                        name: text(c, "/name").into(),
                        kind: text(c, "/type").into(),
                        format: text(c, "/format").into(),
                        description: text(c, "/description").into(),
                        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        source: CellSource::JsonPath(text(c, "/jsonPath").into()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if columns.is_empty() {
            columns.push(Column {
                name: "Age".into(),
                kind: "date".into(),
                format: String::new(),
                description: "Time since creation".into(),
                priority: 0,
                source: CellSource::Computed(|o| {
                    table::age_cell(o.pointer("/metadata/creationTimestamp"))
                }),
            });
        }
        types.push(ResourceType {
            group: group.into(),
            version: version_name.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: {
                let singular = text(crd, "/spec/names/singular");
                if singular.is_empty() {
                    kind.to_lowercase()
                } else {
                    singular.into()
                }
            },
            namespaced: scope == "Namespaced",
            short_names: strings(crd, "/spec/names/shortNames"),
            categories: strings(crd, "/spec/names/categories"),
            status_subresource: version.pointer("/subresources/status").is_some(),
            generation: true,
            custom: true,
            columns,
            schema,
            validator,
            storage: StorageKey {
                group: group.into(),
                plural: plural.into(),
            },
            view: View::Plain,
        });
    }
    Ok(types)
}

/// The status a definition has once its names are accepted and it is served.
pub fn established_status(crd: &Value, now: &str) -> Value {
    let condition = |kind: &str, reason: &str, message: &str| {
        json!({
            "type": kind,
            "status": "True",
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        })
    };
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|versions| {
            versions
                .iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(json!({})),
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}

/// Removes fields the schema does not declare, as the API server prunes them, and returns their
/// paths (`spec.foo`) for strict field validation and warnings.
pub fn prune(schema: &Value, object: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    prune_at(schema, object, "", &mut unknown);
    unknown
}

fn prune_at(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
        && schema.get("properties").is_none()
    {
        return;
    }
    match value {
        Value::Object(map) => {
            if path == "metadata" {
                return;
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                == Some(true);
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let child_schema = properties.and_then(|p| p.get(&key)).or(additional);
                match child_schema {
                    Some(child_schema) => {
                        if let Some(child) = map.get_mut(&key) {
                            prune_at(child_schema, child, &child_path, unknown);
                        }
                    }
                    None if path.is_empty()
                        && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") => {}
                    None if preserve => {}
                    None => {
                        map.remove(&key);
                        unknown.push(child_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter_mut().enumerate() {
                    prune_at(item_schema, item, &format!("{path}[{index}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_reports_undeclared_fields_only() {
        let schema = json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "a": {"type": "string"},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "items": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}}
                }}
            }
        });
        let mut object = json!({
            "apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n", "labels": {"x": "y"}},
            "spec": {"a": "1", "b": 2, "free": {"any": true}, "items": [{"x": 1, "y": 2}]},
            "extra": 1
        });
        let unknown = prune(&schema, &mut object);
        assert_eq!(unknown, ["extra", "spec.b", "spec.items[0].y"]);
        assert_eq!(
            object,
            json!({
                "apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n", "labels": {"x": "y"}},
                "spec": {"a": "1", "free": {"any": true}, "items": [{"x": 1}]}
            })
        );
    }

    #[test]
    fn the_mailboxpoll_crd_serves_its_version_with_columns() {
        let crd = serde_json::to_value(
            <mailpoll::resource::MailboxPoll as kube::CustomResourceExt>::crd(),
        )
        .expect("crd serializes");
        let types = served_types(&crd).expect("the CRD is valid");
        assert_eq!(types.len(), 1);
        let rt = &types[0];
        assert_eq!(
            (rt.group.as_str(), rt.version.as_str()),
            ("mailpoll.dev", "v1alpha1")
        );
        assert!(rt.status_subresource && rt.namespaced);
        assert_eq!(rt.short_names, ["mbp"]);
        let names: Vec<&str> = rt.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Mailbox",
                "Interval",
                "Ready",
                "Reason",
                "Suspended",
                "Last Poll",
                "Delivered",
                "Age",
                "Folder",
                "Next Poll",
                "Pending",
                "Failed",
                "Degraded"
            ]
        );
        let wide: Vec<&str> = rt
            .columns
            .iter()
            .filter(|c| c.priority > 0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            wide,
            ["Folder", "Next Poll", "Pending", "Failed", "Degraded"]
        );
        assert_eq!(
            rt.list_type(&["status".into(), "conditions".into()]),
            super::super::resource::ListType::Map(vec!["type".into()])
        );
    }

    #[test]
    fn a_definition_with_a_wrong_name_is_invalid() {
        let crd = json!({
            "metadata": {"name": "wrong"},
            "spec": {"group": "a.dev", "scope": "Namespaced",
                     "names": {"plural": "things", "kind": "Thing"},
                     "versions": [{"name": "v1", "served": true, "storage": true}]}
        });
        let error = served_types(&crd).err().expect("rejected");
        assert_eq!(error.code, 422);
        assert!(error.message.contains("metadata.name: Invalid value: \"wrong\": must be spec.names.plural+\".\"+spec.group"), "{}", error.message);
    }
}
