//! The object store: every object by resource, namespace and name, one global increasing
//! resourceVersion, the bounded history of changes that watches resume from, and the write path
//! every create, update, patch and delete goes through (server-set metadata, validation,
//! generation, finalizers, no-op detection).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};

use super::builtin::{self, INITIAL_NAMESPACES};
use super::crd;
use super::patch::{self, Scope, Writer};
use super::resource::{ResourceType, StorageKey};
use super::select::{FieldSelector, LabelSelector};
use super::status::{self, ApiError};
use crate::crd_validation::{FieldError, FieldErrorKind};

/// The time format of `metav1.Time`.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches replay it.
#[derive(Debug, Clone)]
pub struct Change {
    pub resource_version: u64,
    pub storage: StorageKey,
    pub namespace: String,
    pub kind: EventType,
    /// The object after the change (its last state for a deletion), in stored form.
    pub object: Value,
    /// The object before a modification, so a selective watch can tell an object entering or
    /// leaving its selection.
    pub previous: Option<Value>,
}

/// `fieldValidation`: what happens to fields the schema does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

/// Who writes and how.
#[derive(Debug, Clone)]
pub struct WriteContext {
    pub manager: String,
    pub field_validation: FieldValidation,
    pub dry_run: bool,
}

/// The outcome of a write: the object as served, and warnings for the `Warning` header.
#[derive(Debug, Clone)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// The kind of patch a PATCH request carries, by its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply { force: bool },
}

/// A list page: objects (served form), the list's resourceVersion, and the continue token.
pub struct Page {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

type Objects = BTreeMap<(String, String), Value>;

pub struct Store {
    resource_version: u64,
    types: Vec<Arc<ResourceType>>,
    objects: BTreeMap<StorageKey, Objects>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// The highest resourceVersion dropped from the history: a watch can resume from any
    /// version at or above it.
    compacted: u64,
    /// Bumped whenever the set of served resources changes (OpenAPI documents' hash).
    types_revision: u64,
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns_subdomain(name)
}

/// Everything but bookkeeping metadata, for deciding whether a write changed anything.
fn content(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    copy
}

/// What generation tracks: everything but metadata, and status when a status subresource
/// owns it.
fn spec_part(rt: &ResourceType, object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        if rt.status_subresource {
            map.remove("status");
        }
        map.remove("apiVersion");
        map.remove("kind");
    }
    copy
}

fn finalizers(object: &Value) -> usize {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let mut store = Self {
            resource_version: 0,
            types: builtin::builtin_types().into_iter().map(Arc::new).collect(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            types_revision: 1,
        };
        let now = now();
        for name in INITIAL_NAMESPACES {
            store.resource_version += 1;
            let object = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {
                    "name": name, "uid": uuid::Uuid::new_v4().to_string(),
                    "resourceVersion": store.resource_version.to_string(),
                    "creationTimestamp": now,
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            store
                .objects
                .entry(StorageKey {
                    group: String::new(),
                    plural: "namespaces".into(),
                })
                .or_default()
                .insert((String::new(), name.to_owned()), object);
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Drops the whole history, as an etcd compaction does: watches and continue tokens from
    /// any earlier version answer 410 Expired from now on.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.resource_version;
    }

    pub fn types(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    pub fn types_revision(&self) -> u64 {
        self.types_revision
    }

    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// Changes after `resource_version` for `storage`, or None when some were compacted away.
    pub fn changes_since(
        &self,
        storage: &StorageKey,
        resource_version: u64,
    ) -> Option<Vec<Change>> {
        if resource_version < self.compacted {
            return None;
        }
        let first = self
            .history
            .partition_point(|c| c.resource_version <= resource_version);
        Some(
            self.history
                .range(first..)
                .filter(|c| &c.storage == storage)
                .cloned()
                .collect(),
        )
    }

    fn objects_of(&self, rt: &ResourceType) -> Option<&Objects> {
        self.objects.get(&rt.storage)
    }

    fn stored(&self, rt: &ResourceType, namespace: &str, name: &str) -> Option<&Value> {
        self.objects_of(rt)?
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.stored(rt, namespace, name)
            .map(|o| builtin::to_view(rt, o.clone()))
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }

    /// One page of `rt`'s objects in `namespace` (all namespaces when None).
    pub fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Page, ApiError> {
        let (list_rv, start_after) = match continue_token {
            Some(token) => {
                let (rv, key) = decode_continue(token)?;
                if rv < self.compacted {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(key))
            }
            None => (self.resource_version, None),
        };
        let matching: Vec<(&(String, String), Value)> = self
            .objects_of(rt)
            .into_iter()
            .flatten()
            .filter(|((ns, _), _)| namespace.is_none_or(|wanted| ns == wanted))
            .filter(|(key, _)| start_after.as_ref().is_none_or(|after| *key > after))
            .map(|(key, object)| (key, builtin::to_view(rt, object.clone())))
            .filter(|(_, object)| labels.matches_object(object) && fields.matches(object))
            .collect();
        let total = matching.len();
        let take = limit.filter(|l| *l > 0).unwrap_or(total).min(total);
        let continue_token = (take < total).then(|| encode_continue(list_rv, matching[take - 1].0));
        let items = matching.into_iter().take(take).map(|(_, o)| o).collect();
        Ok(Page {
            items,
            resource_version: list_rv,
            continue_token,
            remaining: (take < total).then_some(total - take),
        })
    }

    /// Current objects of `rt` matching the selectors, for a watch's initial events.
    pub fn snapshot(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        self.objects_of(rt)
            .into_iter()
            .flatten()
            .filter(|((ns, _), _)| namespace.is_none_or(|wanted| ns == wanted))
            .map(|(_, o)| builtin::to_view(rt, o.clone()))
            .filter(|o| labels.matches_object(o) && fields.matches(o))
            .collect()
    }

    fn check_namespace(&self, rt: &ResourceType, namespace: &str) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        let ns = self
            .objects
            .get(&StorageKey {
                group: String::new(),
                plural: "namespaces".into(),
            })
            .and_then(|all| all.get(&(String::new(), namespace.to_owned())))
            .ok_or_else(|| ApiError::not_found("", "namespaces", namespace))?;
        if ns.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError {
                code: 403,
                reason: "Forbidden",
                message: format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                    status::group_resource(&rt.group, &rt.plural),
                    text(ns, "/metadata/name")
                ),
                details: None,
            });
        }
        Ok(())
    }

    /// POST: a new object.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut object: Value,
        ctx: &WriteContext,
    ) -> Result<Written, ApiError> {
        check_identity(rt, &object)?;
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| missing_name(rt, ""))?;
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if rt.namespaced && !body_ns.is_empty() && body_ns != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            let prefix = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if prefix.is_empty() {
                return Err(missing_name(rt, ""));
            }
            let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_owned();
            name = format!("{prefix}{suffix}");
            meta.insert("name".into(), json!(name));
        }
        self.check_namespace(rt, namespace)?;
        if self.stored(rt, namespace, &name).is_some() {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
        }
        self.commit(
            rt,
            namespace,
            &name,
            None,
            object,
            Scope::for_write(rt, false),
            ctx,
            false,
        )
    }

    /// PUT: a full replacement, guarded by resourceVersion when the body carries one.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        object: Value,
        status_subresource: bool,
        ctx: &WriteContext,
    ) -> Result<Written, ApiError> {
        check_identity(rt, &object)?;
        let body_name = text(&object, "/metadata/name");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let Some(old) = self.stored(rt, namespace, name).cloned() else {
            // Only Leases and Events are created by a PUT, as in the API server's strategies.
            let creates_on_update =
                !rt.custom && !status_subresource && matches!(rt.kind.as_str(), "Lease" | "Event");
            if !creates_on_update {
                return Err(ApiError::not_found(&rt.group, &rt.plural, name));
            }
            return self.create(rt, namespace, object, ctx);
        };
        let wanted = text(&object, "/metadata/resourceVersion");
        if wanted.is_empty() && rt.custom {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                name,
                &[FieldError {
                    field: "metadata.resourceVersion".into(),
                    kind: FieldErrorKind::Invalid,
                    value: Some(json!(0)),
                    detail: "must be specified for an update".into(),
                }],
            ));
        }
        if !wanted.is_empty() && wanted != text(&old, "/metadata/resourceVersion") {
            return Err(ApiError::stale(&rt.group, &rt.plural, name));
        }
        let scope = Scope::for_write(rt, status_subresource);
        self.commit(rt, namespace, name, Some(old), object, scope, ctx, false)
    }

    /// PATCH: merge, JSON, strategic (built-ins only) or server-side apply.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        status_subresource: bool,
        ctx: &WriteContext,
    ) -> Result<Written, ApiError> {
        let scope = Scope::for_write(rt, status_subresource);
        let old = self.stored(rt, namespace, name).cloned();
        let (new, managed) = match kind {
            PatchKind::Strategic if rt.custom => {
                return Err(ApiError::strategic_merge_unsupported());
            }
            PatchKind::Merge | PatchKind::Strategic | PatchKind::Json => {
                let old = old
                    .clone()
                    .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
                let served = builtin::to_view(rt, old.clone());
                let patched = match kind {
                    PatchKind::Json => patch::json_patch(&served, body)?,
                    _ => patch::merge_patch(&served, &strip_directives(body))?,
                };
                let wanted = text(&patched, "/metadata/resourceVersion");
                if !wanted.is_empty() && wanted != text(&old, "/metadata/resourceVersion") {
                    return Err(ApiError::stale(&rt.group, &rt.plural, name));
                }
                (patched, false)
            }
            PatchKind::Apply { force } => {
                check_identity(rt, body).map_err(|_| {
                    ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: apiVersion and kind of an applied configuration must be {} and {}",
                        rt.kind, rt.version, rt.kind, rt.api_version(), rt.kind
                    ))
                })?;
                let body_name = text(body, "/metadata/name");
                if !body_name.is_empty() && body_name != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                if old.is_none() && status_subresource {
                    return Err(ApiError::not_found(&rt.group, &rt.plural, name));
                }
                let wanted = text(body, "/metadata/resourceVersion");
                if !wanted.is_empty() {
                    let current = old
                        .as_ref()
                        .map_or("", |o| text(o, "/metadata/resourceVersion"));
                    if wanted != current {
                        return Err(ApiError::stale(&rt.group, &rt.plural, name));
                    }
                }
                let time = now();
                let writer = Writer {
                    manager: &ctx.manager,
                    api_version: &rt.api_version(),
                    time: &time,
                    scope,
                };
                let base = match &old {
                    Some(old) => builtin::to_view(rt, old.clone()),
                    None => json!({
                        "apiVersion": rt.api_version(), "kind": rt.kind,
                        "metadata": {"name": name, "namespace": namespace},
                    }),
                };
                let mut body = builtin::from_view(rt, body.clone());
                if let Some(prunable) = rt.schema.as_ref() {
                    let unknown = crd::prune(prunable, &mut body);
                    if ctx.field_validation == FieldValidation::Strict && !unknown.is_empty() {
                        return Err(strict_error(rt, &unknown));
                    }
                }
                let applied = patch::apply(rt, &base, &body, &writer, force)?;
                (applied, true)
            }
        };
        match old {
            Some(old) => self.commit(rt, namespace, name, Some(old), new, scope, ctx, managed),
            None => {
                self.check_namespace(rt, namespace)?;
                self.commit(rt, namespace, name, None, new, scope, ctx, managed)
            }
        }
    }

    /// The write path shared by every verb.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        old: Option<Value>,
        new: Value,
        scope: Scope,
        ctx: &WriteContext,
        managed_done: bool,
    ) -> Result<Written, ApiError> {
        let mut warnings = Vec::new();
        check_shape(rt, &new)?;
        let mut new = builtin::from_view(rt, new);
        let time = now();
        // The part of the object this write may not change comes from the stored object.
        match (scope, &old) {
            (Scope::Status, Some(old)) => {
                let status = new.get("status").cloned();
                let managed = new.pointer("/metadata/managedFields").cloned();
                new = old.clone();
                match status {
                    Some(status) => new["status"] = status,
                    None => {
                        if let Some(map) = new.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                if let (true, Some(managed)) = (managed_done, managed) {
                    new["metadata"]["managedFields"] = managed;
                }
            }
            (Scope::Main, _) => {
                if let Some(map) = new.as_object_mut() {
                    match old.as_ref().and_then(|o| o.get("status")) {
                        Some(status) => {
                            map.insert("status".into(), status.clone());
                        }
                        None => {
                            map.remove("status");
                        }
                    }
                }
            }
            _ => {}
        }
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        {
            let meta = new["metadata"]
                .as_object_mut()
                .ok_or_else(|| missing_name(rt, name))?;
            meta.insert("name".into(), json!(name));
            if rt.namespaced {
                meta.insert("namespace".into(), json!(namespace));
            } else {
                meta.remove("namespace");
            }
            match &old {
                Some(old) => {
                    for key in [
                        "uid",
                        "creationTimestamp",
                        "generation",
                        "deletionTimestamp",
                        "deletionGracePeriodSeconds",
                    ] {
                        match old.pointer(&format!("/metadata/{key}")) {
                            Some(v) => meta.insert(key.into(), v.clone()),
                            None => meta.remove(key),
                        };
                    }
                }
                None => {
                    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                    meta.insert("creationTimestamp".into(), json!(time));
                    for key in [
                        "deletionTimestamp",
                        "deletionGracePeriodSeconds",
                        "generation",
                    ] {
                        meta.remove(key);
                    }
                    if rt.generation {
                        meta.insert("generation".into(), json!(1));
                    }
                }
            }
            meta.remove("selfLink");
            if !managed_done {
                meta.remove("managedFields");
            }
            if meta.get("labels").is_some_and(Value::is_null) {
                meta.remove("labels");
            }
            if meta.get("annotations").is_some_and(Value::is_null) {
                meta.remove("annotations");
            }
        }
        if old.is_none() && !is_dns_subdomain(name) {
            let detail = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
            return Err(name_error(rt, name, detail));
        }
        if old.is_none() && rt.kind == "Namespace" && rt.group.is_empty() && !is_dns_label(name) {
            let detail = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
            return Err(name_error(rt, name, detail));
        }
        // Custom resources: pruning, strict field validation, defaults, schema and CEL rules.
        if let (Some(schema), Some(validator)) = (&rt.schema, &rt.validator) {
            let unknown = crd::prune(schema, &mut new);
            if !unknown.is_empty() {
                match ctx.field_validation {
                    FieldValidation::Strict => return Err(strict_error(rt, &unknown)),
                    FieldValidation::Warn => {
                        warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")))
                    }
                    FieldValidation::Ignore => {}
                }
            }
            let old_view = old.as_ref().map(|o| builtin::to_view(rt, o.clone()));
            new = validator
                .validate(&new, old_view.as_ref(), false)
                .map_err(|errors| ApiError::invalid(&rt.group, &rt.kind, name, &errors))?;
        }
        builtin::normalize(rt, &mut new)?;
        let is_crd = rt.group == "apiextensions.k8s.io" && rt.kind == "CustomResourceDefinition";
        let crd_types = if is_crd {
            let served = crd::served_types(&builtin::to_view(rt, new.clone()))?;
            new["status"] = crd::established_status(&new, &time);
            if let Some(old_status) = old.as_ref().and_then(|o| o.get("status")) {
                // Keep the original transition times: the definition stays established.
                if old_status.get("conditions").is_some() {
                    new["status"]["conditions"] = old_status["conditions"].clone();
                }
            }
            Some(served)
        } else {
            None
        };
        if rt.generation
            && let Some(old) = &old
            && spec_part(rt, old) != spec_part(rt, &new)
        {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let served_new = builtin::to_view(rt, new.clone());
        if !managed_done {
            let writer = Writer {
                manager: &ctx.manager,
                api_version: &rt.api_version(),
                time: &time,
                scope,
            };
            let old_view = old.as_ref().map(|o| builtin::to_view(rt, o.clone()));
            let mut tracked = served_new.clone();
            patch::track_update(rt, old_view.as_ref(), &mut tracked, &writer);
            match tracked.pointer("/metadata/managedFields") {
                Some(managed) => new["metadata"]["managedFields"] = managed.clone(),
                None => {
                    if let Some(meta) = new["metadata"].as_object_mut() {
                        meta.remove("managedFields");
                    }
                }
            }
        }
        if let Some(old) = &old
            && content(old) == content(&new)
        {
            return Ok(Written {
                object: builtin::to_view(rt, old.clone()),
                created: false,
                warnings,
            });
        }
        if ctx.dry_run {
            return Ok(Written {
                object: builtin::to_view(rt, new),
                created: old.is_none(),
                warnings,
            });
        }
        let created = old.is_none();
        let terminating = new.pointer("/metadata/deletionTimestamp").is_some();
        if terminating && finalizers(&new) == 0 {
            let served = self.remove(rt, namespace, name, new);
            return Ok(Written {
                object: served,
                created,
                warnings,
            });
        }
        let object = self.store(
            rt,
            namespace,
            name,
            new,
            if created {
                EventType::Added
            } else {
                EventType::Modified
            },
        );
        if let Some(types) = crd_types {
            self.register(&object, types);
        }
        Ok(Written {
            object: builtin::to_view(rt, object),
            created,
            warnings,
        })
    }

    fn next_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.resource_version;
            }
        }
    }

    /// Stores `object` under a new resourceVersion and records the change.
    fn store(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        kind: EventType,
    ) -> Value {
        let rv = self.next_version();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = self
            .objects
            .entry(rt.storage.clone())
            .or_default()
            .insert((namespace.to_owned(), name.to_owned()), object.clone());
        self.record(Change {
            resource_version: rv,
            storage: rt.storage.clone(),
            namespace: namespace.to_owned(),
            kind,
            object: object.clone(),
            previous,
        });
        object
    }

    /// Removes an object for good; returns its last state, served.
    fn remove(&mut self, rt: &ResourceType, namespace: &str, name: &str, mut last: Value) -> Value {
        let rv = self.next_version();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        if let Some(objects) = self.objects.get_mut(&rt.storage) {
            objects.remove(&(namespace.to_owned(), name.to_owned()));
        }
        self.record(Change {
            resource_version: rv,
            storage: rt.storage.clone(),
            namespace: namespace.to_owned(),
            kind: EventType::Deleted,
            object: last.clone(),
            previous: None,
        });
        if rt.group == "apiextensions.k8s.io" && rt.kind == "CustomResourceDefinition" {
            self.unregister(&last);
        }
        if rt.group.is_empty() && rt.kind == "Namespace" {
            self.purge_namespace(name);
        } else if rt.namespaced {
            self.finish_namespace(namespace);
        }
        builtin::to_view(rt, last)
    }

    /// DELETE: removed at once, or marked with deletionTimestamp while finalizers remain.
    /// Returns the object (still present) or a Success status (gone).
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        precondition_rv: Option<&str>,
        precondition_uid: Option<&str>,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let old = self
            .stored(rt, namespace, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
        if let Some(rv) = precondition_rv.filter(|rv| !rv.is_empty())
            && rv != text(&old, "/metadata/resourceVersion")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion: Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    text(&old, "/metadata/resourceVersion")
                ),
            ));
        }
        if let Some(uid) = precondition_uid.filter(|u| !u.is_empty())
            && uid != text(&old, "/metadata/uid")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    text(&old, "/metadata/uid")
                ),
            ));
        }
        if dry_run {
            return Ok((builtin::to_view(rt, old), true));
        }
        let is_namespace = rt.group.is_empty() && rt.kind == "Namespace";
        if finalizers(&old) > 0 || is_namespace {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok((builtin::to_view(rt, old), true));
            }
            let mut marked = old.clone();
            marked["metadata"]["deletionTimestamp"] = json!(now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            if rt.generation {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                marked["metadata"]["generation"] = json!(generation + 1);
            }
            if is_namespace {
                marked["status"] = json!({"phase": "Terminating"});
            }
            let stored = self.store(rt, namespace, name, marked, EventType::Modified);
            if is_namespace {
                self.empty_namespace(name);
                if let Some(current) = self.stored(rt, "", name) {
                    return Ok((builtin::to_view(rt, current.clone()), true));
                }
                return Ok((
                    status::success(&rt.group, &rt.plural, name, text(&stored, "/metadata/uid")),
                    false,
                ));
            }
            return Ok((builtin::to_view(rt, stored), true));
        }
        let uid = text(&old, "/metadata/uid").to_owned();
        self.remove(rt, namespace, name, old);
        Ok((status::success(&rt.group, &rt.plural, name, &uid), false))
    }

    /// Deletes everything in a terminating namespace; the namespace goes once it is empty.
    fn empty_namespace(&mut self, namespace: &str) {
        let types: Vec<Arc<ResourceType>> = self.types.clone();
        let mut seen = Vec::new();
        for rt in types.iter().filter(|t| t.namespaced) {
            if seen.contains(&rt.storage) {
                continue;
            }
            seen.push(rt.storage.clone());
            let names: Vec<String> = self
                .objects_of(rt)
                .into_iter()
                .flatten()
                .filter(|((ns, _), _)| ns == namespace)
                .map(|((_, name), _)| name.clone())
                .collect();
            for name in names {
                let _ = self.delete(rt, namespace, &name, None, None, false);
            }
        }
        self.finish_namespace(namespace);
    }

    fn finish_namespace(&mut self, namespace: &str) {
        let Some(ns_type) = self.lookup("", "v1", "namespaces") else {
            return;
        };
        let Some(ns) = self.stored(&ns_type, "", namespace).cloned() else {
            return;
        };
        if ns.pointer("/metadata/deletionTimestamp").is_none() || finalizers(&ns) > 0 {
            return;
        }
        let occupied = self
            .objects
            .iter()
            .filter(|(key, _)| key.plural != "namespaces" || !key.group.is_empty())
            .any(|(_, objects)| objects.keys().any(|(ns, _)| ns == namespace));
        if !occupied {
            self.remove(&ns_type, "", namespace, ns);
        }
    }

    fn purge_namespace(&mut self, namespace: &str) {
        for objects in self.objects.values_mut() {
            objects.retain(|(ns, _), _| ns != namespace || namespace.is_empty());
        }
    }

    fn register(&mut self, crd: &Value, types: Vec<ResourceType>) {
        let group = text(crd, "/spec/group").to_owned();
        let plural = text(crd, "/spec/names/plural").to_owned();
        self.types
            .retain(|t| !(t.custom && t.group == group && t.plural == plural));
        self.types.extend(types.into_iter().map(Arc::new));
    }

    fn unregister(&mut self, crd: &Value) {
        let group = text(crd, "/spec/group").to_owned();
        let plural = text(crd, "/spec/names/plural").to_owned();
        let Some(rt) = self
            .types
            .iter()
            .find(|t| t.custom && t.group == group && t.plural == plural)
            .cloned()
        else {
            return;
        };
        let keys: Vec<(String, String)> = self
            .objects_of(&rt)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for (ns, name) in keys {
            if let Some(object) = self.stored(&rt, &ns, &name).cloned() {
                let rv = self.next_version();
                let mut last = object;
                last["metadata"]["resourceVersion"] = json!(rv.to_string());
                self.record(Change {
                    resource_version: rv,
                    storage: rt.storage.clone(),
                    namespace: ns.clone(),
                    kind: EventType::Deleted,
                    object: last,
                    previous: None,
                });
            }
        }
        self.objects.remove(&rt.storage);
        self.types
            .retain(|t| !(t.custom && t.group == group && t.plural == plural));
    }
}

impl Scope {
    /// The scope of a write to `rt` (`status` when through the status subresource).
    pub fn for_write(rt: &ResourceType, status_subresource: bool) -> Self {
        match (rt.status_subresource, status_subresource) {
            (_, true) => Scope::Status,
            (true, false) => Scope::Main,
            (false, false) => Scope::All,
        }
    }
}

/// Directives of strategic merge patches, which a plain merge would store as fields.
fn strip_directives(body: &Value) -> Value {
    match body {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with("$"))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn check_identity(rt: &ResourceType, object: &Value) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: the body must be a JSON object",
            rt.kind, rt.version, rt.kind
        )));
    }
    let api_version = text(object, "/apiVersion");
    let kind = text(object, "/kind");
    let served = api_version == rt.api_version()
        || (rt.view == super::resource::View::EventsV1 && api_version == "events.k8s.io/v1");
    if (!api_version.is_empty() && !served) || (!kind.is_empty() && kind != rt.kind) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    if api_version.is_empty() || kind.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{}'",
            object
        )));
    }
    Ok(())
}

/// The decoding errors of the API server for objects whose metadata has the wrong JSON types.
fn check_shape(rt: &ResourceType, object: &Value) -> Result<(), ApiError> {
    let bad = |what: &str| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {what}",
            rt.kind, rt.version, rt.kind
        ))
    };
    let Some(map) = object.as_object() else {
        return Err(bad("the object must be a JSON object"));
    };
    let Some(meta) = map.get("metadata") else {
        return Ok(());
    };
    let Some(meta) = meta.as_object() else {
        return Err(bad("metadata must be an object"));
    };
    for field in ["labels", "annotations"] {
        match meta.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(entries)) if entries.values().all(Value::is_string) => {}
            Some(_) => return Err(bad(&format!("metadata.{field} must be a map of strings"))),
        }
    }
    for field in [
        "name",
        "namespace",
        "generateName",
        "resourceVersion",
        "uid",
    ] {
        if meta
            .get(field)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            return Err(bad(&format!("metadata.{field} must be a string")));
        }
    }
    match meta.get("finalizers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
        Some(_) => return Err(bad("metadata.finalizers must be a list of strings")),
    }
    Ok(())
}

fn missing_name(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::invalid(
        &rt.group,
        &rt.kind,
        name,
        &[FieldError {
            field: "metadata.name".into(),
            kind: FieldErrorKind::Required,
            value: None,
            detail: "name or generateName is required".into(),
        }],
    )
}

fn name_error(rt: &ResourceType, name: &str, detail: &str) -> ApiError {
    ApiError::invalid(
        &rt.group,
        &rt.kind,
        name,
        &[FieldError {
            field: "metadata.name".into(),
            kind: FieldErrorKind::Invalid,
            value: Some(json!(name)),
            detail: detail.into(),
        }],
    )
}

fn strict_error(rt: &ResourceType, unknown: &[String]) -> ApiError {
    let fields: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    ApiError::bad_request(format!(
        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
        rt.kind,
        rt.version,
        rt.kind,
        fields.join(", ")
    ))
}

fn encode_continue(resource_version: u64, after: &(String, String)) -> String {
    use base64::Engine;
    let token = json!({"rv": resource_version, "ns": after.0, "name": after.1});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    use base64::Engine;
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = value.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    Ok((
        rv,
        (
            text(&value, "/ns").to_owned(),
            text(&value, "/name").to_owned(),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(store: &Store) -> Arc<ResourceType> {
        store
            .lookup("", "v1", "secrets")
            .expect("secrets are built in")
    }

    fn ctx() -> WriteContext {
        WriteContext {
            manager: "test".into(),
            field_validation: FieldValidation::Strict,
            dry_run: false,
        }
    }

    fn secret(name: &str, value: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"k": value}})
    }

    #[test]
    fn history_is_bounded_and_compaction_is_reported() {
        let mut store = Store::new(3);
        let rt = secrets(&store);
        let start = store.resource_version();
        for i in 0..5 {
            store
                .create(&rt, "default", secret(&format!("s{i}"), "v"), &ctx())
                .expect("create");
        }
        assert!(
            store.changes_since(&rt.storage, start).is_none(),
            "the oldest changes are gone"
        );
        let recent = store
            .changes_since(&rt.storage, store.resource_version() - 3)
            .expect("recent changes are kept");
        assert_eq!(recent.len(), 3);
        assert!(
            recent
                .windows(2)
                .all(|w| w[0].resource_version < w[1].resource_version)
        );
    }

    #[test]
    fn a_write_that_changes_nothing_is_not_stored() {
        let mut store = Store::new(100);
        let rt = secrets(&store);
        let first = store
            .create(&rt, "default", secret("a", "v"), &ctx())
            .expect("create");
        let rv = store.resource_version();
        let again = store
            .patch(
                &rt,
                "default",
                "a",
                PatchKind::Merge,
                &json!({"stringData": {"k": "v"}}),
                false,
                &ctx(),
            )
            .expect("same value");
        assert_eq!(store.resource_version(), rv);
        assert_eq!(
            again.object["metadata"]["resourceVersion"],
            first.object["metadata"]["resourceVersion"]
        );
        let changed = store
            .patch(
                &rt,
                "default",
                "a",
                PatchKind::Merge,
                &json!({"stringData": {"k": "w"}}),
                false,
                &ctx(),
            )
            .expect("new value");
        assert_eq!(store.resource_version(), rv + 1);
        assert_eq!(changed.object["data"]["k"], "dw==");
    }

    #[test]
    fn pages_continue_where_they_stopped() {
        let mut store = Store::new(100);
        let rt = secrets(&store);
        for name in ["c", "a", "b"] {
            store
                .create(&rt, "default", secret(name, "v"), &ctx())
                .expect("create");
        }
        let all = LabelSelector::default();
        let any = FieldSelector::default();
        let first = store
            .list(&rt, Some("default"), &all, &any, Some(2), None)
            .expect("first page");
        assert_eq!(first.remaining, Some(1));
        let token = first.continue_token.expect("more to come");
        let second = store
            .list(&rt, Some("default"), &all, &any, Some(2), Some(&token))
            .expect("second page");
        let names: Vec<&str> = first
            .items
            .iter()
            .chain(&second.items)
            .filter_map(|o| o.pointer("/metadata/name").and_then(Value::as_str))
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(second.resource_version, first.resource_version);
        assert!(second.continue_token.is_none());
        assert_eq!(
            store
                .list(&rt, None, &all, &any, None, Some("garbage!"))
                .err()
                .map(|e| e.code),
            Some(400)
        );
    }

    #[test]
    fn creates_need_an_existing_namespace_and_a_valid_name() {
        let mut store = Store::new(100);
        let rt = secrets(&store);
        let missing = store
            .create(&rt, "nowhere", secret("a", "v"), &ctx())
            .expect_err("no namespace");
        assert_eq!(
            (missing.code, missing.message.as_str()),
            (404, "namespaces \"nowhere\" not found")
        );
        let invalid = store
            .create(&rt, "default", secret("Not_Valid", "v"), &ctx())
            .expect_err("bad name");
        assert_eq!(invalid.code, 422);
        assert!(
            invalid
                .message
                .starts_with("Secret \"Not_Valid\" is invalid: metadata.name: Invalid value"),
            "{}",
            invalid.message
        );
        let generated = store
            .create(
                &rt,
                "default",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"generateName": "gen-"}}),
                &ctx(),
            )
            .expect("generateName");
        let name = generated.object["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    }
}
