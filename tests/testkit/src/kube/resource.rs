//! What the server knows about one served resource (built-in or from a CRD): names, scope,
//! subresources, printer columns and schema.

use std::sync::Arc;

use serde_json::Value;

use crate::crd_validation::CrdValidator;

/// Where a resource's objects are kept: two served resources may share one store (core/v1 and
/// events.k8s.io/v1 Events are two views of the same objects).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorageKey {
    pub group: String,
    pub plural: String,
}

/// How a served version maps onto stored objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Stored as served.
    Plain,
    /// events.k8s.io/v1 Event over a stored core/v1 Event.
    EventsV1,
}

/// How a printer column finds its cell.
#[derive(Clone)]
pub enum CellSource {
    /// A CRD column's JSONPath.
    JsonPath(String),
    /// A built-in column computed from the object.
    Computed(fn(&Value) -> Value),
}

#[derive(Clone)]
pub struct Column {
    pub name: String,
    /// OpenAPI type: string, integer, number, boolean, date.
    pub kind: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub source: CellSource,
}

/// The `x-kubernetes-list-type` of an array, as server-side apply merges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// One served group/version/resource.
#[derive(Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    /// Whether `metadata.generation` tracks changes outside metadata and status.
    pub generation: bool,
    /// Served from a CustomResourceDefinition (no strategic merge patch).
    pub custom: bool,
    /// Printer columns after Name.
    pub columns: Vec<Column>,
    /// The `openAPIV3Schema` of a custom resource.
    pub schema: Option<Value>,
    pub validator: Option<Arc<CrdValidator>>,
    pub storage: StorageKey,
    pub view: View,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }

    /// The list type of the array at `path` (field names from the root, `[]` steps dropped).
    pub fn list_type(&self, path: &[String]) -> ListType {
        match path {
            [m, f] if m == "metadata" && f == "finalizers" => return ListType::Set,
            [m, f] if m == "metadata" && f == "ownerReferences" => {
                return ListType::Map(vec!["uid".into()]);
            }
            _ => {}
        }
        let Some(mut node) = self.schema.as_ref() else {
            return ListType::Atomic;
        };
        for step in path {
            let next = if node.get("type").and_then(Value::as_str) == Some("array") {
                node.get("items").and_then(|items| child(items, step))
            } else {
                child(node, step)
            };
            match next {
                Some(n) => node = n,
                None => return ListType::Atomic,
            }
        }
        if node.get("type").and_then(Value::as_str) == Some("array") || node.get("items").is_some()
        {
            return list_type_of(node);
        }
        ListType::Atomic
    }
}

fn child<'a>(node: &'a Value, key: &str) -> Option<&'a Value> {
    node.get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))
}

fn list_type_of(node: &Value) -> ListType {
    match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => ListType::Set,
        Some("map") => ListType::Map(
            node.get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|keys| {
                    keys.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => ListType::Atomic,
    }
}
