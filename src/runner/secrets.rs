//! Secrets on one machine, laid out like a mounted Kubernetes Secret:
//! `{name: git-cred, key: token}` is the file `<secrets-dir>/git-cred/token`.

use std::path::{Path, PathBuf};

use crate::api::{Resolved, SecretKeyRef};
use crate::git::GitCredentials;

/// The secret values one execution uses.
#[derive(Clone, Default)]
pub struct Secrets {
    pub git: Option<GitCredentials>,
    pub api_key: Option<String>,
}

/// A secret that cannot be read, naming the field that refers to it and the file.
#[derive(Debug, thiserror::Error)]
#[error("{field}: cannot read secret {name:?} key {key:?} from {}: {reason}; create the file (one value, no newline needed) or fix the reference", path.display())]
pub struct SecretError {
    pub field: String,
    pub name: String,
    pub key: String,
    pub path: PathBuf,
    pub reason: String,
}

fn read(dir: &Path, r: &SecretKeyRef, default_key: &str, field: &str) -> Result<String, SecretError> {
    let key = r.key.clone().unwrap_or_else(|| default_key.to_string());
    let path = dir.join(&r.name).join(&key);
    let err = |reason: String| SecretError {
        field: field.into(),
        name: r.name.clone(),
        key: key.clone(),
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.kind().to_string()))?;
    let value = text.trim_end_matches(['\r', '\n']).to_string();
    if value.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(value)
}

/// Reads every secret the execution refers to. `env` looks up the process environment
/// (ANTHROPIC_API_KEY is the fallback for the API key).
pub fn load(r: &Resolved, dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Secrets, SecretError> {
    let git = match &r.credentials {
        None => None,
        Some(s) => {
            let field = "spec.repository.credentialsSecretRef";
            let token = read(dir, s, "token", field)?;
            let user_ref = SecretKeyRef { name: s.name.clone(), key: Some("username".into()) };
            let username = read(dir, &user_ref, "username", field).unwrap_or_else(|_| "x-access-token".into());
            Some(GitCredentials { username, token })
        }
    };
    let api_key = match &r.api_key {
        Some(s) => Some(read(dir, s, "api-key", "spec.agent.apiKeySecretRef")?),
        None => env("ANTHROPIC_API_KEY").filter(|k| !k.is_empty()),
    };
    Ok(Secrets { git, api_key })
}

/// Replaces every known secret value in text with `***` before it is logged or stored.
#[derive(Clone, Default, Debug)]
pub struct Redactor {
    values: Vec<String>,
}

impl Redactor {
    /// A redactor for these secrets (values shorter than 4 characters are ignored: too common).
    pub fn new(s: &Secrets) -> Self {
        let mut values: Vec<String> =
            s.git.iter().map(|g| g.token.clone()).chain(s.api_key.clone()).filter(|v| v.len() >= 4).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        Self { values }
    }

    /// The text with secrets masked.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "***");
            }
        }
        out
    }

    /// Whether the text holds a secret.
    pub fn finds_secret(&self, text: &str) -> bool {
        self.values.iter().any(|v| text.contains(v.as_str()))
    }
}
