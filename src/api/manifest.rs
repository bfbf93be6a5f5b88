//! Reading a manifest file: one `AgentExecution`, optionally with the `AgentTemplate`s it uses,
//! as YAML documents. Errors name the document and the field path.

use kube::api::ObjectMeta;
use serde::de::DeserializeOwned;

use super::limits::{MAX_MANIFEST_BYTES, MAX_YAML_DEPTH};
use super::{API_VERSION, AgentExecution, AgentExecutionSpec, AgentTemplate, AgentTemplateSpec};

/// The resources found in a manifest file.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The execution to run.
    pub execution: AgentExecution,
    /// Templates given alongside it.
    pub templates: Vec<AgentTemplate>,
}

/// A manifest that cannot be used, with the field it is about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{field}: {message}", document.map(|d| format!("document {d}: ")).unwrap_or_default())]
pub struct ManifestError {
    /// 1-based index of the YAML document, when the file has several.
    pub document: Option<usize>,
    /// Field path, e.g. `spec.repository.url`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl ManifestError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { document: None, field: field.into(), message: message.into() }
    }
}

/// Parses the text of a manifest file. Size and nesting are bounded (`api::limits`) before any
/// value is built, and numbers JSON cannot carry (`.nan`, `.inf`) are refused, not dropped.
pub fn parse_manifest(text: &str) -> Result<Manifest, ManifestError> {
    let (executions, templates, policies) = parse_all(text)?;
    if !policies.is_empty() {
        return Err(ManifestError::new(
            "kind",
            "AgentPolicy is the platform team's: give it with `agentops run --policy FILE`, not in the execution's file",
        ));
    }
    let mut executions = executions.into_iter();
    let execution =
        executions.next().ok_or_else(|| ManifestError::new("kind", "the file has no AgentExecution; add one"))?;
    if executions.next().is_some() {
        return Err(ManifestError::new("kind", "the file has more than one AgentExecution; run one per file"));
    }
    Ok(Manifest { execution, templates })
}

/// Parses a file of `AgentPolicy` documents (`agentops run --policy FILE`), bounded and
/// checked as a manifest is, each policy's values checked too.
pub fn parse_policies(text: &str) -> Result<Vec<super::AgentPolicy>, ManifestError> {
    let (executions, templates, policies) = parse_all(text)?;
    if !executions.is_empty() || !templates.is_empty() {
        return Err(ManifestError::new("kind", "a policy file holds AgentPolicy documents only"));
    }
    for (i, p) in policies.iter().enumerate() {
        super::policy::validate(p).map_err(|mut e| {
            if policies.len() > 1 {
                e.document = Some(i + 1);
            }
            e
        })?;
    }
    Ok(policies)
}

type Parsed = (Vec<AgentExecution>, Vec<AgentTemplate>, Vec<super::AgentPolicy>);

fn parse_all(text: &str) -> Result<Parsed, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::new(
            "(file)",
            format!("is {} bytes; a manifest is limited to {} bytes (1 MiB)", text.len(), MAX_MANIFEST_BYTES),
        ));
    }
    if let Some(line) = too_deep(text) {
        return Err(ManifestError::new(
            "(yaml)",
            format!("nesting deeper than {MAX_YAML_DEPTH} levels at line {line}; a manifest is never that deep"),
        ));
    }
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let yaml_error = |message: String| ManifestError { document: Some(i + 1), field: "(yaml)".into(), message };
        let value: serde_norway::Value =
            serde::Deserialize::deserialize(de).map_err(|e| yaml_error(format!("not valid YAML: {e}")))?;
        if let Some(path) = non_finite(&value, String::new()) {
            return Err(ManifestError {
                document: Some(i + 1),
                field: path.trim_start_matches('.').to_string(),
                message: "is .nan or .inf; use a finite number".into(),
            });
        }
        let value: serde_json::Value =
            serde_json::to_value(&value).map_err(|e| yaml_error(format!("cannot be read as JSON: {e}")))?;
        if !value.is_null() {
            docs.push((i + 1, value));
        }
    }
    let multi = docs.len() > 1;
    let mut executions = Vec::new();
    let mut templates = Vec::new();
    let mut policies = Vec::new();
    for (index, value) in docs {
        let at = |mut e: ManifestError| {
            if multi {
                e.document = Some(index);
            }
            e
        };
        let obj = value.as_object().ok_or_else(|| {
            at(ManifestError::new("(document)", "expected a mapping with apiVersion, kind, metadata and spec"))
        })?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "spec" | "status") {
                return Err(at(ManifestError::new(
                    key.as_str(),
                    "unknown field; expected apiVersion, kind, metadata, spec",
                )));
            }
        }
        let api_version = obj.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
        if api_version != API_VERSION {
            return Err(at(ManifestError::new("apiVersion", format!("is {api_version:?}; expected {API_VERSION:?}"))));
        }
        let kind = obj.get("kind").and_then(|v| v.as_str()).unwrap_or_default();
        let metadata: ObjectMeta = field(obj.get("metadata"), "metadata", false).map_err(at)?;
        if metadata.name.as_deref().unwrap_or_default().is_empty() {
            return Err(at(ManifestError::new("metadata.name", "is required")));
        }
        match kind {
            "AgentExecution" => {
                let spec: AgentExecutionSpec = field(obj.get("spec"), "spec", true).map_err(at)?;
                let mut ax = AgentExecution::new(metadata.name.as_deref().unwrap_or_default(), spec);
                ax.metadata = metadata;
                executions.push(ax);
            }
            "AgentTemplate" => {
                let spec: AgentTemplateSpec = field(obj.get("spec"), "spec", true).map_err(at)?;
                let mut t = AgentTemplate::new(metadata.name.as_deref().unwrap_or_default(), spec);
                t.metadata = metadata;
                templates.push(t);
            }
            "AgentPolicy" => {
                let spec: super::AgentPolicySpec = field(obj.get("spec"), "spec", true).map_err(at)?;
                let mut p = super::AgentPolicy::new(metadata.name.as_deref().unwrap_or_default(), spec);
                p.metadata = metadata;
                policies.push(p);
            }
            other => {
                return Err(at(ManifestError::new(
                    "kind",
                    format!("is {other:?}; expected AgentExecution or AgentTemplate"),
                )));
            }
        }
    }
    Ok((executions, templates, policies))
}

/// The first line where flow collections (`[`, `{`) nest deeper than the limit. The YAML parser
/// takes time quadratic in that nesting (100,000 levels: about a minute of CPU) before its own
/// recursion limit answers, so this cheap scan runs first. Quoted text and comments are skipped;
/// block nesting needs indentation, so the size bound keeps it cheap.
fn too_deep(text: &str) -> Option<usize> {
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let (mut quote, mut prev) = (None::<char>, ' ');
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') if flow > 0 || prev == ' ' => quote = Some(c),
                (None, '#') if prev == ' ' => break,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow > MAX_YAML_DEPTH {
                        return Some(n + 1);
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    None
}

/// The path of the first `.nan` / `.inf` number, if any.
fn non_finite(v: &serde_norway::Value, path: String) -> Option<String> {
    use serde_norway::Value;
    match v {
        Value::Number(n) => n.as_f64().filter(|f| !f.is_finite()).map(|_| path),
        Value::Sequence(items) => {
            items.iter().enumerate().find_map(|(i, item)| non_finite(item, format!("{path}[{i}]")))
        }
        Value::Mapping(m) => m.iter().find_map(|(k, item)| {
            let key = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
            non_finite(item, format!("{path}.{key}"))
        }),
        Value::Tagged(t) => non_finite(&t.value, path),
        _ => None,
    }
}

/// Deserializes one top-level field, naming the full path of a wrong type or an unknown field.
fn field<T: DeserializeOwned + Default>(
    value: Option<&serde_json::Value>,
    name: &str,
    required: bool,
) -> Result<T, ManifestError> {
    let Some(value) = value else {
        return if required { Err(ManifestError::new(name, "is required")) } else { Ok(T::default()) };
    };
    let parsed: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { name.to_string() } else { format!("{name}.{path}") };
        ManifestError::new(path, e.inner().to_string())
    })?;
    // A second pass finds fields the types do not know (a typo would otherwise be silently dropped).
    let mut unknown = Vec::new();
    let _: Result<T, _> = serde_ignored::deserialize(value, |p| unknown.push(p.to_string()));
    if let Some(p) = unknown.into_iter().next() {
        // serde_ignored marks the inside of an Option with `?`: not part of the field's path.
        let p = p.split('.').filter(|s| *s != "?").collect::<Vec<_>>().join(".");
        // A pod or container field that is the operator's: say why it cannot be set.
        if let Some(why) = p.strip_prefix("pod.").and_then(super::pod::operator_field) {
            return Err(ManifestError::new(
                format!("{name}.{p}"),
                format!("cannot be set: {why} (the operator's security settings are not pod settings)"),
            ));
        }
        return Err(ManifestError::new(
            format!("{name}.{p}"),
            "unknown field; check its spelling against `agentops crd`",
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
apiVersion: agentops.dev/v1alpha1
kind: AgentExecution
metadata: {name: hello}
spec:
  prompt: add a greeting
  repository: {url: "http://127.0.0.1/repo.git"}
"#;

    #[test]
    fn flow_nesting_is_bounded_at_exactly_its_limit() {
        let at = |n: usize| format!("spec:\n  workItem: {}{}\n", "[".repeat(n), "]".repeat(n));
        assert_eq!(too_deep(&at(MAX_YAML_DEPTH)), None, "64 levels pass");
        assert_eq!(too_deep(&at(MAX_YAML_DEPTH + 1)), Some(2), "65 do not, on the line they open");
        // Brackets in quotes and comments are text, not nesting.
        let quoted = format!("spec:\n  prompt: \"{}\" # {}\n", "[".repeat(100), "{".repeat(100));
        assert_eq!(too_deep(&quoted), None);
    }

    #[test]
    fn reads_an_execution() {
        let m = parse_manifest(OK).unwrap();
        assert_eq!(m.execution.metadata.name.as_deref(), Some("hello"));
        assert_eq!(m.execution.spec.repository.url, "http://127.0.0.1/repo.git");
        assert!(m.templates.is_empty());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse_manifest(&OK.replace("prompt:", "promt:")).unwrap_err();
        assert_eq!(err.field, "spec.promt");
        let err = parse_manifest(&OK.replace("{url:", "{branch: x, url:")).unwrap_err();
        assert_eq!(err.field, "spec.repository.branch");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = format!("{OK}  agent: {{maxTurns: many}}\n");
        let err = parse_manifest(&text).unwrap_err();
        assert_eq!(err.field, "spec.agent.maxTurns");
        assert!(err.message.contains("invalid type"), "{}", err.message);
    }

    #[test]
    fn missing_url_is_named() {
        let err = parse_manifest(&OK.replace("repository: {url: \"http://127.0.0.1/repo.git\"}", "repository: {}"))
            .unwrap_err();
        assert_eq!(err.field, "spec.repository");
        assert!(err.message.contains("missing field `url`"), "{}", err.message);
    }

    #[test]
    fn multi_document_with_template() {
        let text = format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {{name: t}}\nspec: {{agent: {{model: m}}}}\n---{OK}"
        );
        let m = parse_manifest(&text).unwrap();
        assert_eq!(m.templates.len(), 1);
        let err = parse_manifest(&text.replace("kind: AgentTemplate", "kind: Nope")).unwrap_err();
        assert_eq!((err.document, err.field.as_str()), (Some(1), "kind"));
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        assert!(parse_manifest("spec: [unclosed").is_err());
        assert!(parse_manifest("").is_err());
        assert!(parse_manifest("- a\n- b").is_err());
    }
}
