//! The record of requests the server answered, so tests can compare what a client really
//! calls with what its RBAC grants.

/// One answered API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection; for
    /// non-resource paths (discovery, /version) the lowercase HTTP method.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    pub version: String,
    /// Plural resource name; empty for non-resource requests.
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The request path, for non-resource requests.
    pub path: String,
    /// `fieldManager` query parameter, when given.
    pub field_manager: Option<String>,
    pub user_agent: Option<String>,
    /// Who sent it: the bearer token of its kubeconfig user (see `KubeEmulator::kubeconfig_for`),
    /// `None` for anonymous requests.
    pub user: Option<String>,
    /// How long an injected fault held the answer back (the request itself took effect).
    pub held_for: Option<std::time::Duration>,
    /// When the answer left (after any hold).
    pub answered_at: std::time::Instant,
    /// HTTP status code of the answer (200 for watches that started).
    pub code: u16,
}

impl RequestRecord {
    /// `verb group/resource[/subresource]`, the shape of an RBAC rule, e.g.
    /// `patch mailpoll.dev/mailboxpolls/status`.
    pub fn rbac_key(&self) -> String {
        let mut key = format!("{} {}/{}", self.verb, self.group, self.resource);
        if let Some(sub) = &self.subresource {
            key.push('/');
            key.push_str(sub);
        }
        key
    }

    pub fn is_resource_request(&self) -> bool {
        !self.resource.is_empty()
    }
}
