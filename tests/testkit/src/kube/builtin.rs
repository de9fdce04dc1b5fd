//! The built-in resources the emulator serves, and the server-side rules particular to them:
//! Secrets fold `stringData` into `data`, events.k8s.io/v1 Events are a view of core/v1 Events.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::resource::{CellSource, Column, ResourceType, StorageKey, View};
use super::status::ApiError;
use super::table;

/// Names of the namespaces every cluster starts with.
pub const INITIAL_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

fn column(name: &str, kind: &str, description: &str, source: fn(&Value) -> Value) -> Column {
    Column {
        name: name.into(),
        kind: kind.into(),
        format: String::new(),
        description: description.into(),
        priority: 0,
        source: CellSource::Computed(source),
    }
}

fn age_column() -> Column {
    column("Age", "string", "Time since creation", |o| {
        table::age_cell(o.pointer("/metadata/creationTimestamp"))
    })
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    short_names: &[&str],
    status_subresource: bool,
    columns: Vec<Column>,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        namespaced,
        short_names: short_names.iter().map(|s| (*s).to_owned()).collect(),
        categories: Vec::new(),
        status_subresource,
        generation: false,
        custom: false,
        columns,
        schema: None,
        validator: None,
        storage: StorageKey {
            group: group.into(),
            plural: plural.into(),
        },
        view: View::Plain,
    }
}

/// Every built-in resource, in discovery order.
pub fn builtin_types() -> Vec<ResourceType> {
    let namespaces = builtin(
        "",
        "v1",
        "Namespace",
        "namespaces",
        false,
        &["ns"],
        true,
        vec![
            column("Status", "string", "The phase of the namespace", |o| {
                o.pointer("/status/phase").cloned().unwrap_or(Value::Null)
            }),
            age_column(),
        ],
    );
    let secrets = builtin(
        "",
        "v1",
        "Secret",
        "secrets",
        true,
        &[],
        false,
        vec![
            column("Type", "string", "The type of the secret", |o| {
                o.get("type").cloned().unwrap_or(Value::Null)
            }),
            column("Data", "string", "The number of data keys", |o| {
                json!(o.get("data").and_then(Value::as_object).map_or(0, Map::len))
            }),
            age_column(),
        ],
    );
    let config_maps = builtin(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        true,
        &["cm"],
        false,
        vec![
            column("Data", "string", "The number of data keys", |o| {
                let count = o.get("data").and_then(Value::as_object).map_or(0, Map::len)
                    + o.get("binaryData")
                        .and_then(Value::as_object)
                        .map_or(0, Map::len);
                json!(count)
            }),
            age_column(),
        ],
    );
    let event_columns = || {
        vec![
            column("Last Seen", "string", "Time of the last occurrence", |o| {
                let last = o
                    .get("lastTimestamp")
                    .filter(|v| !v.is_null())
                    .or_else(|| o.get("eventTime").filter(|v| !v.is_null()))
                    .or_else(|| o.pointer("/metadata/creationTimestamp"));
                table::age_cell(last)
            }),
            column("Type", "string", "Normal or Warning", |o| {
                o.get("type").cloned().unwrap_or(Value::Null)
            }),
            column("Reason", "string", "Why the event happened", |o| {
                o.get("reason").cloned().unwrap_or(Value::Null)
            }),
            column("Object", "string", "The object the event is about", |o| {
                let involved = o.get("involvedObject").or_else(|| o.get("regarding"));
                let kind = involved
                    .and_then(|i| i.get("kind"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_lowercase();
                let name = involved
                    .and_then(|i| i.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                json!(format!("{kind}/{name}"))
            }),
            column("Message", "string", "What happened", |o| {
                o.get("message")
                    .or_else(|| o.get("note"))
                    .cloned()
                    .unwrap_or(Value::Null)
            }),
        ]
    };
    let events = builtin(
        "",
        "v1",
        "Event",
        "events",
        true,
        &["ev"],
        false,
        event_columns(),
    );
    let mut events_v1 = builtin(
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        true,
        &["ev"],
        false,
        event_columns(),
    );
    events_v1.storage = events.storage.clone();
    events_v1.view = View::EventsV1;
    let leases = builtin(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        true,
        &[],
        false,
        vec![
            column("Holder", "string", "The current holder", |o| {
                o.pointer("/spec/holderIdentity")
                    .cloned()
                    .unwrap_or(Value::Null)
            }),
            age_column(),
        ],
    );
    let mut crds = builtin(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        true,
        vec![column(
            "Created At",
            "date",
            "When the definition was created",
            |o| {
                o.pointer("/metadata/creationTimestamp")
                    .cloned()
                    .unwrap_or(Value::Null)
            },
        )],
    );
    crds.generation = true;
    crds.categories = vec!["api-extensions".into()];
    let mut validating_webhooks = builtin(
        super::admission::GROUP,
        "v1",
        "ValidatingWebhookConfiguration",
        super::admission::VALIDATING_PLURAL,
        false,
        &[],
        false,
        vec![
            column("Webhooks", "integer", "The number of webhooks", |o| {
                json!(
                    o.get("webhooks")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)
                )
            }),
            age_column(),
        ],
    );
    validating_webhooks.generation = true;
    validating_webhooks.categories = vec!["api-extensions".into()];
    let mut types = vec![
        namespaces,
        secrets,
        config_maps,
        events,
        events_v1,
        leases,
        crds,
        validating_webhooks,
    ];
    types.extend(workload_types());
    types
}

fn ready_replicas(o: &Value) -> Value {
    let ready = o
        .pointer("/status/readyReplicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let wanted = o
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    json!(format!("{ready}/{wanted}"))
}

fn service_type(o: &Value) -> Value {
    o.pointer("/spec/type")
        .cloned()
        .unwrap_or(json!("ClusterIP"))
}

fn cluster_ip(o: &Value) -> Value {
    o.pointer("/spec/clusterIP")
        .cloned()
        .unwrap_or(json!("<none>"))
}

fn role_ref(o: &Value) -> Value {
    let kind = o
        .pointer("/roleRef/kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = o
        .pointer("/roleRef/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    json!(format!("{kind}/{name}"))
}

/// What a Helm chart of an operator installs besides its CRD, stored as written (no
/// controllers run them), so a rendered chart can be applied to the emulator.
fn workload_types() -> Vec<ResourceType> {
    let rbac = "rbac.authorization.k8s.io";
    let mut deployments = builtin(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        true,
        &["deploy"],
        true,
        vec![
            column(
                "Ready",
                "string",
                "Ready replicas of the wanted",
                ready_replicas,
            ),
            age_column(),
        ],
    );
    deployments.generation = true;
    deployments.categories = vec!["all".into()];
    let mut services = builtin(
        "",
        "v1",
        "Service",
        "services",
        true,
        &["svc"],
        true,
        vec![
            column("Type", "string", "The type of the service", service_type),
            column("Cluster-IP", "string", "The cluster IP", cluster_ip),
            age_column(),
        ],
    );
    services.categories = vec!["all".into()];
    vec![
        builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            &["sa"],
            false,
            vec![age_column()],
        ),
        services,
        deployments,
        builtin(
            rbac,
            "v1",
            "Role",
            "roles",
            true,
            &[],
            false,
            vec![age_column()],
        ),
        builtin(
            rbac,
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            &[],
            false,
            vec![age_column()],
        ),
        builtin(
            rbac,
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
            &[],
            false,
            vec![
                column("Role", "string", "The bound role", role_ref),
                age_column(),
            ],
        ),
        builtin(
            rbac,
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            &[],
            false,
            vec![
                column("Role", "string", "The bound role", role_ref),
                age_column(),
            ],
        ),
    ]
}

/// Server-side rules applied to every written object of a built-in type, before storing.
pub fn normalize(rt: &ResourceType, object: &mut Value) -> Result<(), ApiError> {
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Secret") => normalize_secret(object),
        ("", "Namespace") => {
            let phase = if object.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating"
            } else {
                "Active"
            };
            object["status"] = json!({"phase": phase});
            if object.pointer("/spec/finalizers").is_none() {
                object["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn normalize_secret(object: &mut Value) -> Result<(), ApiError> {
    let engine = base64::engine::general_purpose::STANDARD;
    let Some(map) = object.as_object_mut() else {
        return Ok(());
    };
    let mut data = match map.remove("data") {
        Some(Value::Object(data)) => data,
        Some(Value::Null) | None => Map::new(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "Secret in version \"v1\" cannot be handled as a Secret: data must be a map of base64 strings",
            ));
        }
    };
    for (key, value) in &data {
        let valid = value
            .as_str()
            .is_some_and(|text| engine.decode(text).is_ok());
        if !valid {
            return Err(ApiError::bad_request(format!(
                "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data in data.{key}"
            )));
        }
    }
    if let Some(Value::Object(string_data)) = map.remove("stringData") {
        for (key, value) in string_data {
            let text = value.as_str().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Secret in version \"v1\" cannot be handled as a Secret: stringData.{key} must be a string"
                ))
            })?;
            data.insert(key, Value::String(engine.encode(text)));
        }
    }
    if !data.is_empty() {
        map.insert("data".into(), Value::Object(data));
    }
    if !map.contains_key("type") {
        map.insert("type".into(), json!("Opaque"));
    }
    Ok(())
}

/// Field pairs between core/v1 (stored) and events.k8s.io/v1 (served) Events.
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

/// A stored object as `rt` serves it.
pub fn to_view(rt: &ResourceType, mut stored: Value) -> Value {
    if rt.view == View::EventsV1
        && let Some(map) = stored.as_object_mut()
    {
        for (core, v1) in EVENT_FIELDS {
            if let Some(value) = map.remove(core) {
                map.insert(v1.into(), value);
            }
        }
    }
    if let Some(map) = stored.as_object_mut() {
        map.insert("apiVersion".into(), json!(rt.api_version()));
        map.insert("kind".into(), json!(rt.kind));
    }
    stored
}

/// An object as written through `rt`, in its stored form.
pub fn from_view(rt: &ResourceType, mut served: Value) -> Value {
    if rt.view == View::EventsV1
        && let Some(map) = served.as_object_mut()
    {
        for (core, v1) in EVENT_FIELDS {
            if let Some(value) = map.remove(v1) {
                map.insert(core.into(), value);
            }
        }
        map.insert("apiVersion".into(), json!("v1"));
    }
    served
}
