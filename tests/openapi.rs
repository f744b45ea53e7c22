//! Linode's published OpenAPI schemas (`tests/data/linode-openapi-subset.yaml`) as JSON-schema
//! validators, so that the fake Linode API and the client's requests cannot drift from the
//! documented API.
//!
//! OpenAPI 3.0 schemas are JSON Schema draft 4 plus a few differences, adapted here:
//! - `nullable: true` becomes a `null` alternative (`type: [T, "null"]`, or `anyOf` when the
//!   schema has no `type`);
//! - the label `pattern` is replaced: the spec's `^[a-zA-Z]((?!--|__|..)[a-zA-Z0-9-_.])+$`
//!   has an unescaped `..` (any two characters), so it rejects every label of three or more
//!   characters; the replacement follows the spec's prose (begin and end with a letter or
//!   digit; letters, digits, `-`, `_`, `.`; no `--`, `__` or `..`);
//! - formats are not checked: Linode documents `date-time` yet returns timestamps without an
//!   offset (`2018-01-01T00:01:01`, its own examples).

use std::sync::OnceLock;

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// The label rule of the spec's prose.
pub const LABEL_PATTERN: &str = r"^[a-zA-Z0-9](?:[a-zA-Z0-9]|-(?!-)|_(?!_)|\.(?!\.))*[a-zA-Z0-9]$";

/// The spec as JSON, adapted (see the module doc).
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/linode-openapi-subset.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the OpenAPI subset is in tests/data");
        let docs = YamlLoader::load_from_str(&text).expect("the OpenAPI subset is valid YAML");
        let mut v = to_json(&docs[0]);
        adapt(&mut v);
        v
    })
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(s.clone()), Value::Number),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) | Yaml::Real(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

/// Converts `nullable` and replaces the broken label pattern, everywhere.
fn adapt(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for x in m.values_mut() {
                adapt(x);
            }
            if m.get("pattern").and_then(Value::as_str)
                == Some("^[a-zA-Z]((?!--|__|..)[a-zA-Z0-9-_.])+$")
            {
                m.insert("pattern".into(), Value::String(LABEL_PATTERN.into()));
            }
            if m.remove("nullable") == Some(Value::Bool(true)) {
                match m.get("type").cloned() {
                    Some(Value::String(t)) => {
                        m.insert("type".into(), serde_json::json!([t, "null"]));
                        if let Some(Value::Array(e)) = m.get_mut("enum") {
                            e.push(Value::Null);
                        }
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(m));
                        let mut alt = Map::new();
                        alt.insert("anyOf".into(), serde_json::json!([inner, {"type": "null"}]));
                        *m = alt;
                    }
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(adapt),
        _ => {}
    }
}

/// A JSON pointer fragment (in a URI) for a path key: `/linode/instances/{linodeId}` ->
/// `~1linode~1instances~1%7BlinodeId%7D`.
fn escape(s: &str) -> String {
    s.replace('~', "~0")
        .replace('/', "~1")
        .replace('{', "%7B")
        .replace('}', "%7D")
}

/// A validator for the schema at `pointer` (a JSON pointer into the spec), with every `$ref`
/// resolved against the spec.
pub fn validator(pointer: &str) -> jsonschema::Validator {
    let mut root = spec().clone();
    // Draft 4 ignores a `$ref`'s siblings: the root validates exactly the pointed-to schema.
    root.as_object_mut()
        .expect("the spec is an object")
        .insert("$ref".into(), Value::String(format!("#{pointer}")));
    jsonschema::draft4::options()
        .should_validate_formats(false)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {pointer} compiles: {e}"))
}

/// The request body schema of `METHOD PATH` (`PATH` as in the spec, e.g.
/// `/linode/instances/{linodeId}`).
pub fn request_pointer(method: &str, path: &str) -> String {
    format!(
        "/paths/{}/{}/requestBody/content/application~1json/schema",
        escape(path),
        method.to_ascii_lowercase()
    )
}

/// The response schema of `METHOD PATH` for `status` (200, or the error response).
pub fn response_pointer(method: &str, path: &str, status: u16) -> String {
    if status == 200 {
        format!(
            "/paths/{}/{}/responses/200/content/application~1json/schema",
            escape(path),
            method.to_ascii_lowercase()
        )
    } else {
        "/components/responses/ErrorResponse/content/application~1json/schema".into()
    }
}

/// Every violation of the schema at `pointer` by `instance`, as readable lines.
pub fn violations(pointer: &str, instance: &Value) -> Vec<String> {
    static CACHE: OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
    > = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let cached = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(pointer)
        .cloned();
    let v = match cached {
        Some(v) => v,
        None => {
            let v = std::sync::Arc::new(validator(pointer));
            cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pointer.to_string(), v.clone());
            v
        }
    };
    v.iter_errors(instance)
        .map(|e| format!("{pointer}: at {}: {e}", e.instance_path()))
        .collect()
}
