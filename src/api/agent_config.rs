//! The agent's configuration a team gives it: instructions (CLAUDE.md), permission rules, which
//! setting sources the CLI honours, MCP servers, skills and subagents. Set in an AgentTemplate
//! and per execution (`spec.agent`); resolved once when the execution starts (the runner reads it
//! from its frozen manifest), checked here with field paths, and hashed so that a team can tell
//! which configuration produced which change. Pure: `agent::config` writes the files.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ManifestError, SecretKeyRef, limits};

/// Settings written to the agent's user settings (`$CLAUDE_CONFIG_DIR/settings.json`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// Claude Code permission rules. With any rule the agent no longer runs with
    /// `bypassPermissions`: what no rule allows is refused (nobody answers a prompt headless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
}

/// Claude Code's `permissions` block: rules like `Bash(npm test:*)`, `Read(./secrets/**)`,
/// `mcp__tracker__search`. The template's and the execution's rules add up.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Permissions {
    /// Calls the agent may make without asking. At most 128 rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), inner(length(max = 1024)))]
    pub allow: Vec<String>,
    /// Calls refused, whatever else allows them (also read-only commands the CLI would approve
    /// by itself). At most 128 rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), inner(length(max = 1024)))]
    pub deny: Vec<String>,
    /// Calls that would ask a person; headless, nobody answers, so they are refused. At most 128.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), inner(length(max = 1024)))]
    pub ask: Vec<String>,
    /// The permission mode for calls no rule decides. The execution's wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<PermissionMode>,
}

/// Claude Code's permission modes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PermissionMode {
    /// Anything that would ask is refused (headless).
    Default,
    /// File edits are allowed without asking.
    AcceptEdits,
    /// Only what a rule allows runs.
    DontAsk,
    /// Read-only planning.
    Plan,
    /// Everything not denied runs (inside the sandbox).
    BypassPermissions,
}

impl PermissionMode {
    /// The CLI's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionMode::Default => "default",
            PermissionMode::AcceptEdits => "acceptEdits",
            PermissionMode::DontAsk => "dontAsk",
            PermissionMode::Plan => "plan",
            PermissionMode::BypassPermissions => "bypassPermissions",
        }
    }
}

/// Where Claude Code reads settings from (`--setting-sources`): `user` is the agent's private
/// HOME, which the operator writes; `project` and `local` are the repository's own
/// `.claude/settings.json` (hooks!), `.claude/settings.local.json`, `.mcp.json` and CLAUDE.md.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SettingSource {
    User,
    Project,
    Local,
}

impl SettingSource {
    /// The CLI's name of the source.
    pub fn as_str(self) -> &'static str {
        match self {
            SettingSource::User => "user",
            SettingSource::Project => "project",
            SettingSource::Local => "local",
        }
    }
}

/// An MCP server the agent may use: a local process (`command`) or a remote endpoint (`url`),
/// reached through the operator's gateway, which adds the Secret-backed headers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpServer {
    /// The server's name; its tools are `mcp__<name>__<tool>`. Lowercase letters, digits, `-`, `_`.
    #[schemars(length(max = 64))]
    pub name: String,
    /// A stdio server: the program to start (in the agent's sandbox, with its HOME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub command: Option<String>,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Its environment: plain values only (credentials belong in `headersFrom` of a remote server).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A remote server's URL (`https://`, or `http://` to loopback); the agent reaches it only
    /// through the operator's gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// A remote server's transport: `http` (streamable HTTP, default) or `sse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<McpTransport>,
    /// Headers the gateway adds to every request to a remote server, from Secrets. The agent
    /// never sees their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub headers_from: Vec<McpHeader>,
}

/// A remote MCP server's transport.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum McpTransport {
    /// Streamable HTTP.
    #[default]
    Http,
    /// Server-sent events.
    Sse,
}

/// A header whose value comes from a Secret key.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpHeader {
    /// The header's name, e.g. `Authorization`.
    #[schemars(length(max = 256))]
    pub name: String,
    /// The Secret key holding its value (default key `value`).
    pub secret_key_ref: SecretKeyRef,
}

/// A skill: a directory of files under `~/.claude/skills/<name>/`, with `SKILL.md` among them.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Skill {
    /// The skill's directory name. Lowercase letters, digits, `-`, `_`.
    #[schemars(length(max = 64))]
    pub name: String,
    /// The files inline, by file name (`SKILL.md` required).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// A ConfigMap whose keys are the files (cluster only: read when the execution starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapRef>,
}

/// A subagent: the file `~/.claude/agents/<name>.md` (front matter `name`, `description`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subagent {
    /// The subagent's file name (without `.md`). Lowercase letters, digits, `-`, `_`.
    #[schemars(length(max = 64))]
    pub name: String,
    /// The file inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A ConfigMap key holding the file (cluster only: read when the execution starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeyRef>,
}

/// A ConfigMap in the execution's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ConfigMapRef {
    /// Its name.
    pub name: String,
}

/// A key of a ConfigMap in the execution's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// Its name.
    pub name: String,
    /// The key.
    pub key: String,
}

/// The agent's configuration as it runs: template and execution merged, every value checked,
/// every ConfigMap read. Serialized (stably: sorted maps) for the hash.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    pub instructions: Option<String>,
    pub permissions: Option<Permissions>,
    /// Always contains `user`; sorted.
    pub setting_sources: Vec<SettingSource>,
    pub mcp_servers: Vec<McpServer>,
    /// Skill name → files (name → content).
    pub skills: BTreeMap<String, BTreeMap<String, String>>,
    /// Subagent name → file content.
    pub subagents: BTreeMap<String, String>,
    /// `spec.agent.allowedTools` / `disallowedTools` (the execution's, else the template's):
    /// part of what the agent may do, so of the hash.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_tools: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disallowed_tools: Vec<String>,
}

/// What ran, as the summary, the store and `executions show` list it: names, counts and the
/// hash, never a value of a Secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentConfigRecord {
    /// SHA-256 (hex) over the whole resolved configuration (`AgentConfig::hash`).
    pub hash: String,
    /// Characters of the instructions (CLAUDE.md); 0: none.
    pub instructions_chars: u64,
    pub setting_sources: Vec<String>,
    /// Rules: allow, deny, ask; and the default mode, if set.
    pub permissions: Option<PermissionCounts>,
    pub mcp_servers: Vec<String>,
    /// `allowedTools` and `disallowedTools` as given (tool names and patterns, no values).
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    /// The permission mode the CLI ran with (empty in records from before it was kept).
    pub permission_mode: String,
    pub skills: Vec<String>,
    pub subagents: Vec<String>,
}

/// The permission mode for `c` with these tool lists (`AgentConfig::permission_mode`).
pub fn permission_mode(c: &AgentConfig, allowed_tools: &[String], disallowed_tools: &[String]) -> PermissionMode {
    match c.permissions.as_ref().and_then(|p| p.default_mode) {
        Some(mode) => mode,
        None if c.has_rules() || !allowed_tools.is_empty() || !disallowed_tools.is_empty() => PermissionMode::Default,
        None => PermissionMode::BypassPermissions,
    }
}

/// How many permission rules of each kind ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PermissionCounts {
    pub allow: u64,
    pub deny: u64,
    pub ask: u64,
    pub default_mode: Option<String>,
}

impl AgentConfig {
    /// SHA-256 (hex) of the configuration's canonical JSON, with the permission mode it runs
    /// with. Secrets enter by reference only.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_vec(&serde_json::json!({"config": self, "permissionMode": self.permission_mode()}))
            .unwrap_or_default();
        let digest = sha2::Sha256::digest(&json);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether permission rules decide the agent's calls (then it runs without
    /// `bypassPermissions`, unless the rules' default mode is that).
    pub fn has_rules(&self) -> bool {
        self.permissions.as_ref().is_some_and(|p| !(p.allow.is_empty() && p.deny.is_empty() && p.ask.is_empty()))
    }

    /// The mode the CLI runs with (`--permission-mode`): the rules' default mode; else
    /// `default` when rules or tool lists decide (what they do not allow is refused: nobody
    /// answers a prompt headless); else `bypassPermissions` (every tool, inside the sandbox).
    pub fn permission_mode(&self) -> PermissionMode {
        permission_mode(self, &self.allowed_tools, &self.disallowed_tools)
    }

    /// The record of what ran.
    pub fn record(&self) -> AgentConfigRecord {
        AgentConfigRecord {
            hash: self.hash(),
            instructions_chars: self.instructions.as_ref().map_or(0, |i| i.chars().count() as u64),
            setting_sources: self.setting_sources.iter().map(|s| s.as_str().to_string()).collect(),
            permissions: self.permissions.as_ref().map(|p| PermissionCounts {
                allow: p.allow.len() as u64,
                deny: p.deny.len() as u64,
                ask: p.ask.len() as u64,
                default_mode: p.default_mode.map(|m| m.as_str().to_string()),
            }),
            mcp_servers: self.mcp_servers.iter().map(|s| s.name.clone()).collect(),
            allowed_tools: self.allowed_tools.clone(),
            disallowed_tools: self.disallowed_tools.clone(),
            permission_mode: self.permission_mode().as_str().to_string(),
            skills: self.skills.keys().cloned().collect(),
            subagents: self.subagents.keys().cloned().collect(),
        }
    }
}

/// The parts of `spec.agent` (template's, execution's) this module resolves.
pub struct Parts<'a> {
    pub instructions: Option<&'a String>,
    pub settings: Option<&'a AgentSettings>,
    pub setting_sources: Option<&'a Vec<SettingSource>>,
    pub mcp_servers: &'a [McpServer],
    pub skills: &'a [Skill],
    pub subagents: &'a [Subagent],
}

impl<'a> Parts<'a> {
    /// The parts of one `spec.agent`.
    pub fn of(a: &'a super::AgentSpec) -> Self {
        Parts {
            instructions: a.instructions.as_ref(),
            settings: a.settings.as_ref(),
            setting_sources: a.setting_sources.as_ref(),
            mcp_servers: &a.mcp_servers,
            skills: &a.skills,
            subagents: &a.subagents,
        }
    }
}

/// Merges the template's configuration (`template`) with the execution's (`own`): the
/// execution's instructions, setting sources and default mode win; rules add up; MCP servers,
/// skills and subagents merge by name (the execution's wins). Checks every value.
pub fn resolve_agent_config(template: Option<Parts<'_>>, own: Parts<'_>) -> Result<AgentConfig, ManifestError> {
    // Where a value came from, for its field path.
    let field = |from_template: bool, path: String| {
        if from_template { format!("the AgentTemplate's spec.agent.{path}") } else { format!("spec.agent.{path}") }
    };
    let instructions = match (own.instructions, template.as_ref().and_then(|t| t.instructions)) {
        (Some(i), _) => Some((false, i)),
        (None, Some(i)) => Some((true, i)),
        (None, None) => None,
    };
    if let Some((t, i)) = instructions
        && i.chars().count() > limits::MAX_INSTRUCTIONS_CHARS
    {
        return Err(ManifestError::new(
            field(t, "instructions".into()),
            format!(
                "is {} characters long; the limit is {}: keep the team's rules short, and put long guides in skills",
                i.chars().count(),
                limits::MAX_INSTRUCTIONS_CHARS
            ),
        ));
    }

    let mut permissions: Option<Permissions> = None;
    for (t, p) in [
        (true, template.as_ref().and_then(|t| t.settings).and_then(|s| s.permissions.as_ref())),
        (false, own.settings.and_then(|s| s.permissions.as_ref())),
    ] {
        let Some(p) = p else { continue };
        for (kind, rules) in [("allow", &p.allow), ("deny", &p.deny), ("ask", &p.ask)] {
            if rules.len() > limits::MAX_TOOL_RULES
                || rules.iter().any(|r| r.trim().is_empty() || r.chars().count() > limits::MAX_TOOL_RULE_CHARS)
            {
                return Err(ManifestError::new(
                    field(t, format!("settings.permissions.{kind}")),
                    format!(
                        "has {} rules; use at most {}, each 1 to {} characters, e.g. \"Bash(npm test:*)\"",
                        rules.len(),
                        limits::MAX_TOOL_RULES,
                        limits::MAX_TOOL_RULE_CHARS
                    ),
                ));
            }
        }
        let merged = permissions.get_or_insert_with(Permissions::default);
        for (to, from) in [(&mut merged.allow, &p.allow), (&mut merged.deny, &p.deny), (&mut merged.ask, &p.ask)] {
            for rule in from {
                if !to.contains(rule) {
                    to.push(rule.clone());
                }
            }
        }
        if p.default_mode.is_some() {
            merged.default_mode = p.default_mode;
        }
    }
    if let Some(p) = &permissions {
        let size = serde_json::to_string(p).map_or(0, |j| j.len());
        if size > limits::MAX_PERMISSIONS_JSON_BYTES {
            return Err(ManifestError::new(
                "spec.agent.settings.permissions",
                format!(
                    "is {size} bytes as JSON with the template's; at most {} (use wider rules)",
                    limits::MAX_PERMISSIONS_JSON_BYTES
                ),
            ));
        }
        for (kind, rules) in [("allow", &p.allow), ("deny", &p.deny), ("ask", &p.ask)] {
            if rules.len() > limits::MAX_TOOL_RULES {
                return Err(ManifestError::new(
                    format!("spec.agent.settings.permissions.{kind}"),
                    format!("has {} rules with the template's; use at most {}", rules.len(), limits::MAX_TOOL_RULES),
                ));
            }
        }
    }

    let (sources_from_template, sources) =
        match (own.setting_sources, template.as_ref().and_then(|t| t.setting_sources)) {
            (Some(s), _) => (false, s.clone()),
            (None, Some(s)) => (true, s.clone()),
            (None, None) => (false, vec![SettingSource::User]),
        };
    if !sources.contains(&SettingSource::User) {
        return Err(ManifestError::new(
            field(sources_from_template, "settingSources".into()),
            "must include user: the instructions, permission rules, skills and subagents are the agent's user settings",
        ));
    }
    let mut setting_sources = sources;
    setting_sources.sort();
    setting_sources.dedup();

    let mut mcp_servers: Vec<McpServer> = Vec::new();
    let from_template = template.as_ref().map(|t| t.mcp_servers).unwrap_or_default();
    for (t, i, s) in from_template
        .iter()
        .enumerate()
        .map(|(i, s)| (true, i, s))
        .chain(own.mcp_servers.iter().enumerate().map(|(i, s)| (false, i, s)))
    {
        check_mcp_server(s, &field(t, format!("mcpServers[{i}]")))?;
        mcp_servers.retain(|m| m.name != s.name);
        mcp_servers.push(s.clone());
    }
    if mcp_servers.len() > limits::MAX_MCP_SERVERS {
        return Err(ManifestError::new(
            "spec.agent.mcpServers",
            format!("has {} servers with the template's; at most {}", mcp_servers.len(), limits::MAX_MCP_SERVERS),
        ));
    }
    mcp_servers.sort_by(|a, b| a.name.cmp(&b.name));

    let mut skills = BTreeMap::new();
    let from_template = template.as_ref().map(|t| t.skills).unwrap_or_default();
    for (t, i, s) in from_template
        .iter()
        .enumerate()
        .map(|(i, s)| (true, i, s))
        .chain(own.skills.iter().enumerate().map(|(i, s)| (false, i, s)))
    {
        let at = field(t, format!("skills[{i}]"));
        check_name(&s.name, &format!("{at}.name"))?;
        if s.config_map_ref.is_some() {
            return Err(ManifestError::new(
                format!("{at}.configMapRef"),
                "ConfigMaps are read by the controller in a cluster; on one machine give the files inline (files: {SKILL.md: ...})",
            ));
        }
        if !s.files.contains_key("SKILL.md") {
            return Err(ManifestError::new(
                format!("{at}.files"),
                "needs a SKILL.md (front matter name and description)",
            ));
        }
        for name in s.files.keys() {
            check_file_name(name, &format!("{at}.files"))?;
        }
        skills.insert(s.name.clone(), s.files.clone());
    }
    let mut subagents = BTreeMap::new();
    let from_template = template.as_ref().map(|t| t.subagents).unwrap_or_default();
    for (t, i, s) in from_template
        .iter()
        .enumerate()
        .map(|(i, s)| (true, i, s))
        .chain(own.subagents.iter().enumerate().map(|(i, s)| (false, i, s)))
    {
        let at = field(t, format!("subagents[{i}]"));
        check_name(&s.name, &format!("{at}.name"))?;
        let content = match (&s.content, &s.config_map_key_ref) {
            (Some(c), None) => c.clone(),
            (None, Some(_)) => {
                return Err(ManifestError::new(
                    format!("{at}.configMapKeyRef"),
                    "ConfigMaps are read by the controller in a cluster; on one machine give the file inline (content: ...)",
                ));
            }
            _ => return Err(ManifestError::new(at, "set either content or configMapKeyRef")),
        };
        subagents.insert(s.name.clone(), content);
    }
    if skills.len() > limits::MAX_SKILLS || subagents.len() > limits::MAX_SKILLS {
        return Err(ManifestError::new(
            "spec.agent.skills",
            format!("at most {} skills and {} subagents (with the template's)", limits::MAX_SKILLS, limits::MAX_SKILLS),
        ));
    }
    let files: usize = skills.values().flat_map(|f| f.values()).chain(subagents.values()).map(String::len).sum();
    if files > limits::MAX_AGENT_FILES_BYTES {
        return Err(ManifestError::new(
            "spec.agent.skills",
            format!(
                "skills and subagents hold {files} bytes with the template's; at most {} (the runner's manifest is at most 1 MiB)",
                limits::MAX_AGENT_FILES_BYTES
            ),
        ));
    }

    Ok(AgentConfig {
        instructions: instructions.map(|(_, i)| i.clone()).filter(|i| !i.trim().is_empty()),
        permissions,
        setting_sources,
        mcp_servers,
        skills,
        subagents,
        // Set by `resolve` (they are resolved with the rest of `spec.agent`).
        allowed_tools: Vec::new(),
        disallowed_tools: Vec::new(),
    })
}

fn check_name(name: &str, field: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ManifestError::new(
            field,
            format!(
                "{name:?} is not a name; use 1 to 64 lowercase letters, digits, '-' or '_', starting with a letter or digit"
            ),
        ))
    }
}

/// A file of a skill: a ConfigMap key (`[-._a-zA-Z0-9]+`), never `.` or `..`.
fn check_file_name(name: &str, field: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::new(
            format!("{field}.{name}"),
            "is not a file name; use letters, digits, '-', '_' and '.' (as a ConfigMap key)",
        ))
    }
}

fn check_mcp_server(s: &McpServer, at: &str) -> Result<(), ManifestError> {
    check_name(&s.name, &format!("{at}.name"))?;
    match (&s.command, &s.url) {
        (Some(c), None) => {
            if c.trim().is_empty() {
                return Err(ManifestError::new(format!("{at}.command"), "is empty; name the program to start"));
            }
            if s.transport.is_some() || !s.headers_from.is_empty() {
                return Err(ManifestError::new(
                    at,
                    "transport and headersFrom are for a remote server (url); a stdio server has command, args, env",
                ));
            }
            if s.args.len() > limits::MAX_HOOK_ARGS
                || s.args.iter().any(|a| a.chars().count() > limits::MAX_HOOK_ARG_CHARS)
            {
                return Err(ManifestError::new(
                    format!("{at}.args"),
                    format!(
                        "use at most {} arguments of at most {} characters",
                        limits::MAX_HOOK_ARGS,
                        limits::MAX_HOOK_ARG_CHARS
                    ),
                ));
            }
            if s.env.len() > limits::MAX_MCP_ENV
                || s.env.iter().any(|(k, v)| {
                    k.is_empty()
                        || k.contains('=')
                        || k.contains('\0')
                        || v.contains('\0')
                        || v.chars().count() > limits::MAX_HOOK_ARG_CHARS
                })
            {
                return Err(ManifestError::new(
                    format!("{at}.env"),
                    format!(
                        "use at most {} variables, names without '=', values of at most {} characters",
                        limits::MAX_MCP_ENV,
                        limits::MAX_HOOK_ARG_CHARS
                    ),
                ));
            }
        }
        (None, Some(url)) => {
            if !s.args.is_empty() || !s.env.is_empty() {
                return Err(ManifestError::new(
                    at,
                    "args and env are for a stdio server (command); a remote server has url",
                ));
            }
            check_remote_url(url, &format!("{at}.url"))?;
            for (i, h) in s.headers_from.iter().enumerate() {
                let hf = format!("{at}.headersFrom[{i}]");
                let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
                if h.name.is_empty() || !h.name.bytes().all(token) {
                    return Err(ManifestError::new(
                        format!("{hf}.name"),
                        format!("{:?} is not an HTTP header name", h.name),
                    ));
                }
                let reserved = ["host", "content-length", "transfer-encoding", "connection", "mcp-session-id"];
                if reserved.contains(&h.name.to_ascii_lowercase().as_str()) {
                    return Err(ManifestError::new(
                        format!("{hf}.name"),
                        format!("{} is set by the gateway itself; use another header", h.name),
                    ));
                }
                super::resolve::check_secret_ref(&h.secret_key_ref, &format!("{hf}.secretKeyRef"))?;
            }
        }
        (Some(_), Some(_)) => {
            return Err(ManifestError::new(at, "set either command (stdio) or url (remote), not both"));
        }
        (None, None) => {
            return Err(ManifestError::new(at, "needs a command (a stdio server) or a url (a remote server)"));
        }
    }
    Ok(())
}

/// A remote server's URL: https, or http to loopback; no credentials, no fragment.
fn check_remote_url(url: &str, field: &str) -> Result<(), ManifestError> {
    let parsed = url::Url::parse(url).map_err(|e| ManifestError::new(field, format!("is not a URL: {e}")))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    let ok_scheme = parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback);
    if !ok_scheme || url.chars().count() > limits::MAX_URL_CHARS {
        return Err(ManifestError::new(field, "must be an https:// URL (http:// only to loopback)"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.fragment().is_some() {
        return Err(ManifestError::new(
            field,
            "must not carry credentials or a fragment; put a token in headersFrom (a Secret), which the gateway adds",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{parse_manifest, resolve};

    fn resolved(template_agent: &str, own_agent: &str) -> Result<AgentConfig, ManifestError> {
        let text = format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {{name: t}}\nspec:\n  agent: {template_agent}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: a}}\nspec:\n  prompt: p\n  templateRef: {{name: t}}\n  repository: {{url: 'http://127.0.0.1/r.git'}}\n  agent: {own_agent}\n"
        );
        let m = parse_manifest(&text)?;
        resolve(&m.execution, &m.templates).map(|r| r.agent_config)
    }

    #[test]
    fn the_execution_adds_rules_and_wins_by_name() {
        let c = resolved(
            "{instructions: team, settings: {permissions: {deny: ['Bash(curl:*)'], defaultMode: acceptEdits}}, mcpServers: [{name: a, command: x}, {name: b, command: y}], skills: [{name: s, files: {SKILL.md: one}}]}",
            "{settings: {permissions: {deny: ['Bash(rm:*)'], allow: [Read]}}, mcpServers: [{name: b, command: z}], subagents: [{name: r, content: hi}]}",
        )
        .unwrap();
        assert_eq!(c.instructions.as_deref(), Some("team"));
        let p = c.permissions.as_ref().unwrap();
        assert_eq!(p.deny, ["Bash(curl:*)", "Bash(rm:*)"]);
        assert_eq!(p.allow, ["Read"]);
        assert_eq!(p.default_mode, Some(PermissionMode::AcceptEdits));
        let servers: Vec<_> = c.mcp_servers.iter().map(|s| (s.name.as_str(), s.command.as_deref())).collect();
        assert_eq!(servers, [("a", Some("x")), ("b", Some("z"))]);
        assert_eq!(c.setting_sources, [SettingSource::User], "the safe default");
        assert_eq!(c.record().skills, ["s"]);
        assert_eq!(c.record().subagents, ["r"]);
    }

    #[test]
    fn the_hash_follows_the_configuration_and_nothing_else() {
        let base = resolved("{instructions: team}", "{}").unwrap();
        assert_eq!(base.hash(), resolved("{instructions: team}", "{}").unwrap().hash());
        assert_eq!(base.hash().len(), 64);
        assert_ne!(base.hash(), resolved("{instructions: team!}", "{}").unwrap().hash());
        assert_ne!(
            base.hash(),
            resolved("{instructions: team, settingSources: [user, project]}", "{}").unwrap().hash()
        );
        // The tool lists are part of it (they decide what the agent may do).
        let listed = resolved("{instructions: team}", "{allowedTools: [Read]}").unwrap();
        assert_ne!(base.hash(), listed.hash());
        let denied = resolved("{instructions: team}", "{disallowedTools: [Bash, Write, Edit]}").unwrap();
        assert_ne!(base.hash(), denied.hash());
        assert_ne!(listed.hash(), denied.hash());
        assert_eq!(listed.record().allowed_tools, ["Read"]);
        assert_eq!(denied.record().disallowed_tools, ["Bash", "Write", "Edit"]);
        assert_eq!(
            (base.record().permission_mode.as_str(), listed.record().permission_mode.as_str()),
            ("bypassPermissions", "default")
        );
        // Only the configuration counts: the model is not part of it.
        assert_eq!(base.hash(), resolved("{instructions: team, model: m}", "{}").unwrap().hash());
    }

    #[test]
    fn bad_values_name_their_field() {
        for (t, own, field) in [
            ("{}", "{settingSources: [project]}", "spec.agent.settingSources"),
            ("{settingSources: [local]}", "{}", "the AgentTemplate's spec.agent.settingSources"),
            ("{}", "{mcpServers: [{name: a}]}", "spec.agent.mcpServers[0]"),
            ("{}", "{mcpServers: [{name: 'A b', command: x}]}", "spec.agent.mcpServers[0].name"),
            ("{}", "{mcpServers: [{name: a, command: x, url: 'https://h'}]}", "spec.agent.mcpServers[0]"),
            ("{}", "{mcpServers: [{name: a, url: 'http://example.com/mcp'}]}", "spec.agent.mcpServers[0].url"),
            ("{}", "{mcpServers: [{name: a, url: 'https://u:p@h/mcp'}]}", "spec.agent.mcpServers[0].url"),
            (
                "{}",
                "{mcpServers: [{name: a, url: 'https://h/mcp', headersFrom: [{name: 'Bad Name', secretKeyRef: {name: s}}]}]}",
                "spec.agent.mcpServers[0].headersFrom[0].name",
            ),
            (
                "{}",
                "{mcpServers: [{name: a, url: 'https://h/mcp', headersFrom: [{name: X, secretKeyRef: {name: ../s}}]}]}",
                "spec.agent.mcpServers[0].headersFrom[0].secretKeyRef.name",
            ),
            ("{}", "{skills: [{name: s, files: {README.md: x}}]}", "spec.agent.skills[0].files"),
            ("{}", "{skills: [{name: s, files: {SKILL.md: x, ../up: y}}]}", "spec.agent.skills[0].files.../up"),
            ("{}", "{skills: [{name: s, configMapRef: {name: c}}]}", "spec.agent.skills[0].configMapRef"),
            ("{}", "{subagents: [{name: r}]}", "spec.agent.subagents[0]"),
            ("{subagents: [{name: ../r, content: x}]}", "{}", "the AgentTemplate's spec.agent.subagents[0].name"),
            ("{}", "{settings: {permissions: {deny: ['']}}}", "spec.agent.settings.permissions.deny"),
        ] {
            let err = resolved(t, own).unwrap_err();
            assert_eq!(err.field, field, "{t} {own}: {err}");
        }
        let long = format!("{{instructions: '{}'}}", "x".repeat(limits::MAX_INSTRUCTIONS_CHARS + 1));
        assert_eq!(resolved(&long, "{}").unwrap_err().field, "the AgentTemplate's spec.agent.instructions");
        let fits = format!("{{instructions: '{}'}}", "x".repeat(limits::MAX_INSTRUCTIONS_CHARS));
        assert!(resolved(&fits, "{}").is_ok());
    }
}
