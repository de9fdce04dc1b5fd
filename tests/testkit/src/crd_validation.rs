//! Validation of custom resources against a CRD, in the order and with the messages of a real
//! API server: schema defaults applied, then the structural OpenAPI checks (types, required,
//! enum, pattern, lengths, bounds), then the CEL rules (`x-kubernetes-validations`) unless a
//! type error blocks them.

use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_core::cel;
use serde_json::Value;

/// One rejected field, rendered as the API server renders a `field.Error`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.interval`.
    pub field: String,
    pub kind: FieldErrorKind,
    /// The offending value, when the kind shows one.
    pub value: Option<Value>,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    /// A wrong JSON type: blocks CEL evaluation, as in the API server.
    TypeInvalid,
    Invalid,
    Unsupported,
    TooLong,
    TooMany,
    /// A field the schema does not declare (reported under strict field validation).
    Unknown,
}

impl FieldError {
    fn new(
        field: &str,
        kind: FieldErrorKind,
        value: Option<&Value>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            field: field.to_owned(),
            kind,
            value: value.cloned(),
            detail: detail.into(),
        }
    }

    /// The API server's `Status.details.causes[].reason` for this error.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::Unsupported => "FieldValueNotSupported",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::TooMany => "FieldValueTooMany",
            FieldErrorKind::Unknown => "FieldValueInvalid",
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self
            .value
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_else(|| "null".into());
        match self.kind {
            FieldErrorKind::Required => write!(f, "{}: Required value", self.field),
            FieldErrorKind::TypeInvalid | FieldErrorKind::Invalid => {
                write!(f, "{}: Invalid value: {value}: {}", self.field, self.detail)
            }
            FieldErrorKind::Unsupported => write!(
                f,
                "{}: Unsupported value: {value}: {}",
                self.field, self.detail
            ),
            FieldErrorKind::TooLong => write!(f, "{}: Too long: {}", self.field, self.detail),
            FieldErrorKind::TooMany => write!(f, "{}: Too many: {}", self.field, self.detail),
            FieldErrorKind::Unknown => write!(f, "{}: {}", self.field, self.detail),
        }
    }
}

/// The validator of one served version of a CRD.
pub struct CrdValidator {
    schema: Value,
    compiled: cel::CompiledSchema,
}

impl CrdValidator {
    /// The validator for `version` of `crd`; errors when the version or its schema is missing.
    pub fn from_crd(crd: &CustomResourceDefinition, version: &str) -> anyhow::Result<Self> {
        let served = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .ok_or_else(|| {
                anyhow::anyhow!("CRD {} has no version {version}", crd.spec.names.plural)
            })?;
        let schema = served
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| anyhow::anyhow!("version {version} has no openAPIV3Schema"))?;
        Self::from_schema(serde_json::to_value(schema)?)
    }

    /// The validator of an `openAPIV3Schema`; errors when a CEL rule does not compile.
    pub fn from_schema(schema: Value) -> anyhow::Result<Self> {
        let compiled = cel::compile_schema(&schema);
        if compiled.has_errors() {
            let errors: Vec<String> = compiled
                .compilation_errors()
                .iter()
                .map(|e| e.to_string())
                .collect();
            anyhow::bail!("CEL rules do not compile: {}", errors.join("; "));
        }
        Ok(Self { schema, compiled })
    }

    /// The object with schema defaults filled in, as the API server stores it.
    pub fn apply_defaults(&self, object: &Value) -> Value {
        cel::apply_defaults(&self.schema, object)
    }

    /// Defaults `object`, then validates it (`old` for transition rules on updates). Returns the
    /// defaulted object, or every field error found. Unknown fields are reported only when
    /// `strict` (kubectl's default `fieldValidation=Strict`).
    pub fn validate(
        &self,
        object: &Value,
        old: Option<&Value>,
        strict: bool,
    ) -> Result<Value, Vec<FieldError>> {
        let defaulted = self.apply_defaults(object);
        let mut errors = Vec::new();
        check(&self.schema, &defaulted, "", &mut errors, strict);
        let blocking = errors.iter().any(|e| e.kind == FieldErrorKind::TypeInvalid);
        if blocking {
            errors.push(FieldError::new(
                "<nil>",
                FieldErrorKind::Invalid,
                None,
                "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
            ));
        } else if let Err(failures) = cel::validate_compiled(&self.compiled, &defaulted, old) {
            for failure in failures.as_slice() {
                let field = if failure.field_path.is_empty() {
                    "<nil>".to_owned()
                } else {
                    failure.field_path.clone()
                };
                let value = lookup(&defaulted, &field);
                errors.push(FieldError::new(
                    &field,
                    FieldErrorKind::Invalid,
                    value,
                    failure.message.clone(),
                ));
            }
        }
        if errors.is_empty() {
            Ok(defaulted)
        } else {
            Err(errors)
        }
    }
}

fn lookup<'a>(root: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted
        .split('.')
        .filter(|s| !s.is_empty())
        .try_fold(root, |v, key| v.get(key))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        "number" => value.is_number(),
        _ => true,
    }
}

/// The structural OpenAPI checks of the API server, recursively.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>, strict: bool) {
    let flag = |name: &str| schema.get(name).and_then(Value::as_bool).unwrap_or(false);
    if value.is_null() {
        if !flag("nullable") && schema.get("type").is_some() && !path.is_empty() {
            let expected = schema
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("object");
            errors.push(FieldError::new(
                path,
                FieldErrorKind::TypeInvalid,
                Some(value),
                format!("{path} in body must be of type {expected}: \"null\""),
            ));
        }
        return;
    }
    if flag("x-kubernetes-int-or-string") {
        if !(value.is_string() || type_matches("integer", value)) {
            errors.push(FieldError::new(
                path,
                FieldErrorKind::TypeInvalid,
                Some(value),
                format!(
                    "{path} in body must be of type integer or string: \"{}\"",
                    type_name(value)
                ),
            ));
        }
        return;
    }
    if let Some(expected) = schema.get("type").and_then(Value::as_str)
        && !type_matches(expected, value)
    {
        errors.push(FieldError::new(
            path,
            FieldErrorKind::TypeInvalid,
            Some(value),
            format!(
                "{path} in body must be of type {expected}: \"{}\"",
                type_name(value)
            ),
        ));
        return;
    }
    // The API server validates metadata itself (names, labels), not through the CRD schema.
    if path == "metadata" {
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(FieldError::new(
            path,
            FieldErrorKind::Unsupported,
            Some(value),
            format!("supported values: {}", list.join(", ")),
        ));
    }
    match value {
        Value::String(text) => check_string(schema, text, value, path, errors),
        Value::Number(number) => check_number(
            schema,
            number.as_f64().unwrap_or_default(),
            value,
            path,
            errors,
        ),
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                errors.push(FieldError::new(
                    path,
                    FieldErrorKind::TooMany,
                    None,
                    format!("{} items: must have at most {max} items", items.len()),
                ));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errors.push(FieldError::new(
                    path,
                    FieldErrorKind::Invalid,
                    Some(value),
                    format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    check(
                        item_schema,
                        item,
                        &format!("{path}[{index}]"),
                        errors,
                        strict,
                    );
                }
            }
        }
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for key in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(key) {
                        errors.push(FieldError::new(
                            &join(path, key),
                            FieldErrorKind::Required,
                            None,
                            "",
                        ));
                    }
                }
            }
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = flag("x-kubernetes-preserve-unknown-fields");
            for (key, child) in map {
                let child_path = join(path, key);
                if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
                    check(child_schema, child, &child_path, errors, strict);
                } else if let Some(child_schema) = additional {
                    check(child_schema, child, &child_path, errors, strict);
                } else if strict
                    && !preserve
                    && !(path.is_empty()
                        && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
                {
                    errors.push(FieldError::new(
                        &format!(".{child_path}"),
                        FieldErrorKind::Unknown,
                        None,
                        format!("unknown field \"{child_path}\""),
                    ));
                }
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_string(
    schema: &Value,
    text: &str,
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let chars = text.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        errors.push(FieldError::new(
            path,
            FieldErrorKind::TooLong,
            None,
            format!("may not be more than {max} bytes"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        errors.push(FieldError::new(
            path,
            FieldErrorKind::Invalid,
            Some(value),
            format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match compiled_pattern(pattern) {
            Some(re) if re.is_match(text) => {}
            Some(_) => errors.push(FieldError::new(
                path,
                FieldErrorKind::Invalid,
                Some(value),
                format!("{path} in body should match '{pattern}'"),
            )),
            None => errors.push(FieldError::new(
                path,
                FieldErrorKind::Invalid,
                Some(value),
                format!("the schema's pattern {pattern:?} does not compile"),
            )),
        }
    }
}

/// A schema pattern, compiled once per process (as the API server keeps its compiled
/// schemas): compiling it on every write was a good part of the emulator's CPU under load.
fn compiled_pattern(pattern: &str) -> Option<regex::Regex> {
    static COMPILED: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, Option<regex::Regex>>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut compiled = COMPILED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    compiled
        .entry(pattern.to_owned())
        .or_insert_with(|| regex::Regex::new(pattern).ok())
        .clone()
}

fn check_number(
    schema: &Value,
    number: f64,
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let flag = |name: &str| schema.get(name).and_then(Value::as_bool).unwrap_or(false);
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        let exclusive = flag("exclusiveMinimum");
        if number < min || (exclusive && number == min) {
            let relation = if exclusive {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(FieldError::new(
                path,
                FieldErrorKind::Invalid,
                Some(value),
                format!("{path} in body should be {relation} {min}"),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        let exclusive = flag("exclusiveMaximum");
        if number > max || (exclusive && number == max) {
            let relation = if exclusive {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(FieldError::new(
                path,
                FieldErrorKind::Invalid,
                Some(value),
                format!("{path} in body should be {relation} {max}"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validator() -> CrdValidator {
        CrdValidator::from_schema(json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
                        "count": {"type": "integer", "minimum": 1, "maximum": 3, "default": 2},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "tags": {"type": "array", "maxItems": 1, "items": {"type": "string"}}
                    },
                    "x-kubernetes-validations": [{"rule": "self.count != 3", "message": "spec.count must not be 3"}]
                }
            }
        }))
        .expect("schema compiles")
    }

    fn messages(result: Result<Value, Vec<FieldError>>) -> Vec<String> {
        result
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn defaults_are_applied_before_validation() {
        let ok = validator()
            .validate(&json!({"spec": {"name": "ab"}}), None, true)
            .expect("valid");
        assert_eq!(ok["spec"]["count"], 2);
    }

    #[test]
    fn each_structural_rule_reports_its_field() {
        let v = validator();
        let cases = [
            (json!({"spec": {}}), "spec.name: Required value"),
            (
                json!({"spec": {"name": ""}}),
                "spec.name in body should be at least 1 chars long",
            ),
            (
                json!({"spec": {"name": "abcdef"}}),
                "spec.name: Too long: may not be more than 5 bytes",
            ),
            (
                json!({"spec": {"name": "AB"}}),
                "spec.name in body should match '^[a-z]+$'",
            ),
            (
                json!({"spec": {"name": "a", "count": 0}}),
                "spec.count in body should be greater than or equal to 1",
            ),
            (
                json!({"spec": {"name": "a", "count": 9}}),
                "spec.count in body should be less than or equal to 3",
            ),
            (
                json!({"spec": {"name": "a", "mode": "c"}}),
                "spec.mode: Unsupported value: \"c\"",
            ),
            (
                json!({"spec": {"name": "a", "tags": ["x", "y"]}}),
                "spec.tags: Too many",
            ),
            (
                json!({"spec": {"name": "a", "count": "x"}}),
                "spec.count in body must be of type integer",
            ),
            (
                json!({"spec": {"name": "a", "extra": 1}}),
                "unknown field \"spec.extra\"",
            ),
            (
                json!({"spec": {"name": "a", "count": 3}}),
                "spec.count must not be 3",
            ),
        ];
        for (object, expected) in cases {
            let found = messages(v.validate(&object, None, true));
            assert!(
                found.iter().any(|m| m.contains(expected)),
                "{object}: expected {expected:?} in {found:?}"
            );
        }
    }

    #[test]
    fn type_errors_block_cel_rules() {
        let found = messages(validator().validate(&json!({"spec": {"name": 5}}), None, true));
        assert!(
            found
                .iter()
                .any(|m| m.contains("some validation rules were not checked")),
            "{found:?}"
        );
    }

    #[test]
    fn unknown_fields_pass_when_not_strict() {
        assert!(
            validator()
                .validate(&json!({"spec": {"name": "a", "extra": 1}}), None, false)
                .is_ok()
        );
    }
}
