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
    /// Header values of remote MCP servers: (server, header) → value. Only the gateway adds them.
    pub mcp_headers: std::collections::BTreeMap<(String, String), String>,
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
    let mut mcp_headers = std::collections::BTreeMap::new();
    for (i, server) in r.agent_config.mcp_servers.iter().enumerate() {
        for (j, h) in server.headers_from.iter().enumerate() {
            let field = format!("spec.agent.mcpServers[{i}].headersFrom[{j}].secretKeyRef");
            mcp_headers.insert((server.name.clone(), h.name.clone()), read(dir, &h.secret_key_ref, "value", &field)?);
        }
    }
    Ok(Secrets { git, api_key, mcp_headers })
}

/// Replaces every known secret value in text with `***` before it is logged or stored, and
/// finds secrets in the agent's changes: each value also in the forms an agent might write it
/// to smuggle it out (base64, standard and URL-safe, at any alignment; hex; percent-encoding).
#[derive(Clone, Default, Debug)]
pub struct Redactor {
    values: Vec<String>,
}

/// Shortest encoded fragment matched (shorter ones would match ordinary text).
const MIN_FORM: usize = 8;

/// The forms of one secret value that are searched for.
pub fn encodings(secret: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let bytes = secret.as_bytes();
    let mut forms = vec![secret.to_string()];
    // base64 of a secret inside a longer text depends on where it starts (mod 3): encode it at
    // each offset and keep the characters that depend on the secret's bytes only.
    for shift in 0..3usize {
        let mut shifted = vec![0u8; shift];
        shifted.extend_from_slice(bytes);
        let start = (shift * 8).div_ceil(6);
        let end = (shift + bytes.len()) * 8 / 6;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let enc = engine.encode(&shifted);
            if end > start && end <= enc.len() {
                forms.push(enc[start..end].to_string());
            }
        }
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    forms.push(hex.clone());
    forms.push(hex.to_uppercase());
    forms.push(bytes.iter().map(|b| format!("%{b:02x}")).collect());
    forms.push(bytes.iter().map(|b| format!("%{b:02X}")).collect());
    forms.push(url::form_urlencoded::byte_serialize(bytes).collect());
    forms.retain(|f| f.len() >= MIN_FORM || f == secret);
    forms.sort();
    forms.dedup();
    forms
}

impl Redactor {
    /// A redactor for these secrets (values shorter than 4 characters are ignored: too common).
    pub fn new(s: &Secrets) -> Self {
        Self::from_values(
            s.git.iter().map(|g| g.token.clone()).chain(s.api_key.clone()).chain(s.mcp_headers.values().cloned()),
        )
    }

    /// A redactor for these values, and their encodings.
    pub fn from_values(values: impl IntoIterator<Item = String>) -> Self {
        let mut forms: Vec<String> = values.into_iter().filter(|v| v.len() >= 4).flat_map(|v| encodings(&v)).collect();
        forms.sort_by_key(|v| std::cmp::Reverse(v.len()));
        forms.dedup();
        Self { values: forms }
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

    /// Whether the text holds a secret, plain or encoded.
    pub fn finds_secret(&self, text: &str) -> bool {
        if self.values.iter().any(|v| text.contains(v.as_str())) {
            return true;
        }
        // Split across lines: `base64` wraps at 76 columns and PEM at 64, and a secret cut in two
        // reads the same once the lines are joined (in a file, or the added lines of a diff).
        let joined: String = text.lines().map(|l| l.strip_prefix('+').unwrap_or(l).trim_end_matches('\r')).collect();
        self.values.iter().any(|v| joined.contains(v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn finds_a_secret_in_every_encoding_inside_other_text() {
        let secret = "ghp_agentopsTestToken5f2b9c";
        let r = Redactor::from_values([secret.to_string()]);
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let url_b64 = |s: &str| base64::engine::general_purpose::URL_SAFE.encode(s);
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        for text in [
            format!("token={secret}"),
            b64(secret),
            b64(&format!("x{secret}")),
            b64(&format!("xy{secret}yz")),
            b64(&format!("user:{secret}\n")),
            url_b64(&format!("??{secret}>>")),
            format!("data: {hex}"),
            hex.to_uppercase(),
            secret.bytes().map(|b| format!("%{b:02X}")).collect(),
        ] {
            assert!(r.finds_secret(&text), "finds it in {text}");
            assert!(!r.redact(&text).contains(&text[text.len() / 2..]) || r.redact(&text).contains("***"), "{text}");
        }
        assert!(!r.finds_secret("an ordinary diff of README.md with some base64 aGVsbG8gd29ybGQ="));
    }
}
