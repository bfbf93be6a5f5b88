//! The agent's configuration as Claude Code reads it: files in its private HOME
//! (`$CLAUDE_CONFIG_DIR` is `<home>/.claude`) and the flags that point the CLI at them.
//!
//! | piece | where the CLI finds it |
//! | --- | --- |
//! | instructions | `$CLAUDE_CONFIG_DIR/CLAUDE.md` (user memory) |
//! | permission rules | `$CLAUDE_CONFIG_DIR/settings.json` (`permissions`), `--permission-mode` |
//! | setting sources | `--setting-sources user[,project][,local]`; `--strict-mcp-config` unless `project` |
//! | MCP servers | `$CLAUDE_CONFIG_DIR/agentops-mcp.json` via `--mcp-config` |
//! | skills | `$CLAUDE_CONFIG_DIR/skills/<name>/<file>` |
//! | subagents | `$CLAUDE_CONFIG_DIR/agents/<name>.md` |
//!
//! Nothing is written into the checkout: the HOME is outside it, so nothing of this is committed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::api::{AgentConfig, McpServer, McpTransport};

/// The MCP config file, in `$CLAUDE_CONFIG_DIR`.
pub const MCP_CONFIG_FILE: &str = "agentops-mcp.json";

/// Where the agent reaches a remote MCP server: the gateway's route for it and the agent's token
/// (the gateway adds the Secret-backed headers; the agent never holds them).
#[derive(Clone)]
pub struct McpRoute {
    /// `<gateway>/gateway/{ns}/{name}/mcp` (the server's name is appended).
    pub base_url: String,
    pub token: String,
}

impl std::fmt::Debug for McpRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpRoute").field("base_url", &self.base_url).field("token", &"***").finish()
    }
}

/// `$CLAUDE_CONFIG_DIR` of a private HOME.
pub fn claude_dir(home: &Path) -> PathBuf {
    home.join(".claude")
}

/// Writes the configuration's files into the private HOME (mode 0600, directories 0700).
/// Remote MCP servers need `remote` (the gateway's route); without one they are an error.
pub fn write_files(c: &AgentConfig, home: &Path, remote: Option<&McpRoute>) -> std::io::Result<()> {
    let dir = claude_dir(home);
    mkdir(&dir)?;
    if let Some(text) = &c.instructions {
        write(&dir.join("CLAUDE.md"), text.as_bytes())?;
    }
    if let Some(p) = &c.permissions {
        write(&dir.join("settings.json"), settings_json(p).as_bytes())?;
    }
    if !c.mcp_servers.is_empty() {
        let mut servers = Map::new();
        for s in &c.mcp_servers {
            servers.insert(s.name.clone(), mcp_entry(s, remote)?);
        }
        write(&dir.join(MCP_CONFIG_FILE), json!({ "mcpServers": servers }).to_string().as_bytes())?;
    }
    if !c.skills.is_empty() {
        mkdir(&dir.join("skills"))?;
        for (name, files) in &c.skills {
            let skill = dir.join("skills").join(name);
            mkdir(&skill)?;
            for (file, content) in files {
                write(&skill.join(file), content.as_bytes())?;
            }
        }
    }
    if !c.subagents.is_empty() {
        mkdir(&dir.join("agents"))?;
        for (name, content) in &c.subagents {
            write(&dir.join("agents").join(format!("{name}.md")), content.as_bytes())?;
        }
    }
    Ok(())
}

/// The user settings' JSON for these rules: `{"permissions": {...}}`.
pub fn settings_json(p: &crate::api::Permissions) -> String {
    let mut permissions = Map::new();
    for (key, rules) in [("allow", &p.allow), ("deny", &p.deny), ("ask", &p.ask)] {
        if !rules.is_empty() {
            permissions.insert(key.into(), json!(rules));
        }
    }
    if let Some(mode) = p.default_mode {
        permissions.insert("defaultMode".into(), json!(mode.as_str()));
    }
    json!({ "permissions": permissions }).to_string()
}

/// One server of the MCP config: a stdio process as configured, or a remote server at the
/// gateway's route with the agent's own token (never the server's headers).
fn mcp_entry(s: &McpServer, remote: Option<&McpRoute>) -> std::io::Result<Value> {
    if let Some(command) = &s.command {
        return Ok(json!({"type": "stdio", "command": command, "args": s.args, "env": s.env}));
    }
    let Some(route) = remote else {
        return Err(std::io::Error::other(format!(
            "the remote MCP server {:?} needs the operator's gateway, and this run has none",
            s.name
        )));
    };
    let kind = match s.transport.unwrap_or_default() {
        McpTransport::Http => "http",
        McpTransport::Sse => "sse",
    };
    Ok(json!({
        "type": kind,
        "url": format!("{}/{}", route.base_url.trim_end_matches('/'), s.name),
        "headers": {"Authorization": format!("Bearer {}", route.token)},
    }))
}

/// The CLI flags for the configuration: permission mode, tools, setting sources, MCP config.
/// `allowed_tools` and `disallowed_tools` are `spec.agent.allowedTools` / `disallowedTools`.
pub fn flags(c: &AgentConfig, allowed_tools: &[String], disallowed_tools: &[String], home: &Path) -> Vec<String> {
    // Always explicit: a `defaultMode` the agent writes into its own settings file (which the
    // CLI reloads mid-run) cannot widen what the rules or tool lists allow.
    let mode = crate::api::agent_config::permission_mode(c, allowed_tools, disallowed_tools);
    let mut args = vec!["--permission-mode".to_string(), mode.as_str().to_string()];
    if let Some(p) = &c.permissions {
        // The same rules as flag settings too: the agent can rewrite the settings file in its own
        // HOME (the CLI reloads it mid-run), never its own arguments; a deny rule here holds even
        // with `defaultMode: bypassPermissions`. Bounded by `resolve` to fit one argument.
        args.extend(["--settings".into(), settings_json(p)]);
    }
    if !allowed_tools.is_empty() {
        // The CLI approves "read-only" commands (echo, id, ls, cat) and tools by itself whatever
        // the allow list says; a built-in tool that the list does not name at all is removed
        // from the session instead, so the list holds for whole tools.
        args.extend(["--tools".into(), builtin_tools(allowed_tools).join(",")]);
        args.extend(["--allowedTools".into(), allowed_tools.join(",")]);
    }
    if !disallowed_tools.is_empty() {
        args.extend(["--disallowedTools".into(), disallowed_tools.join(",")]);
    }
    let sources: Vec<&str> = c.setting_sources.iter().map(|s| s.as_str()).collect();
    args.extend(["--setting-sources".into(), sources.join(",")]);
    if !c.setting_sources.contains(&crate::api::SettingSource::Project) {
        // The repository's `.mcp.json` starts processes; honoured only with `project`.
        args.push("--strict-mcp-config".into());
    }
    if !c.mcp_servers.is_empty() {
        args.extend(["--mcp-config".into(), claude_dir(home).join(MCP_CONFIG_FILE).to_string_lossy().into_owned()]);
    }
    args
}

/// The built-in tools an allow list names (`Bash(cargo test:*)` names Bash), in its order. MCP
/// tools (`mcp__...`) are not built-in: `--allowedTools` alone governs them.
fn builtin_tools(allowed: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for rule in allowed {
        let name = rule.split('(').next().unwrap_or_default().trim();
        if !name.is_empty() && !name.starts_with("mcp__") && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

fn mkdir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// Writes a new file (a planted symlink or file in its place is an error, never followed).
fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PermissionMode, Permissions, SettingSource};

    fn config() -> AgentConfig {
        AgentConfig { setting_sources: vec![SettingSource::User], ..Default::default() }
    }

    #[test]
    fn without_rules_or_lists_the_agent_bypasses_permissions_and_reads_only_its_own_settings() {
        let f = flags(&config(), &[], &[], Path::new("/h"));
        assert_eq!(f, ["--permission-mode", "bypassPermissions", "--setting-sources", "user", "--strict-mcp-config"]);
    }

    #[test]
    fn rules_end_bypass_and_the_allow_list_removes_unnamed_tools() {
        let mut c = config();
        c.permissions = Some(Permissions { deny: vec!["Bash(curl:*)".into()], ..Default::default() });
        let f = flags(&c, &[], &[], Path::new("/h"));
        assert!(!f.iter().any(|a| a == "bypassPermissions"), "{f:?}");
        assert_eq!(&f[..2], ["--permission-mode", "default"]);
        assert!(f.windows(2).any(|w| w == ["--settings", r#"{"permissions":{"deny":["Bash(curl:*)"]}}"#]), "{f:?}");
        let allowed = ["Read".to_string(), "Bash(cargo test:*)".into(), "Bash(git diff:*)".into(), "mcp__t__s".into()];
        let f = flags(&config(), &allowed, &[], Path::new("/h"));
        let tools = f.iter().position(|a| a == "--tools").map(|i| f[i + 1].clone());
        assert_eq!(tools.as_deref(), Some("Read,Bash"));
        c.permissions = Some(Permissions { default_mode: Some(PermissionMode::AcceptEdits), ..Default::default() });
        let f = flags(&c, &[], &[], Path::new("/h"));
        assert_eq!(&f[..2], ["--permission-mode", "acceptEdits"]);
        // Tool lists without rules: `default`, named, not left to a settings file the agent can write.
        let f = flags(&config(), &allowed, &[], Path::new("/h"));
        assert_eq!(&f[..2], ["--permission-mode", "default"]);
        let f = flags(&config(), &[], &["Bash".into()], Path::new("/h"));
        assert_eq!(&f[..2], ["--permission-mode", "default"]);
    }

    #[test]
    fn the_repositorys_sources_and_mcp_servers_are_read_only_when_asked() {
        let mut c = config();
        c.setting_sources = vec![SettingSource::User, SettingSource::Project, SettingSource::Local];
        c.mcp_servers = vec![McpServer { name: "t".into(), command: Some("x".into()), ..Default::default() }];
        let f = flags(&c, &[], &[], Path::new("/h"));
        assert!(f.windows(2).any(|w| w == ["--setting-sources", "user,project,local"]), "{f:?}");
        let local_only = AgentConfig { setting_sources: vec![SettingSource::User, SettingSource::Local], ..c.clone() };
        assert!(flags(&local_only, &[], &[], Path::new("/h")).iter().any(|a| a == "--strict-mcp-config"));
        assert!(!f.iter().any(|a| a == "--strict-mcp-config"));
        assert!(f.windows(2).any(|w| w == ["--mcp-config", "/h/.claude/agentops-mcp.json"]), "{f:?}");
    }

    #[test]
    fn files_land_in_the_private_home_and_a_planted_symlink_is_not_followed() {
        let home = tempfile::tempdir().unwrap();
        let mut c = config();
        c.instructions = Some("Use tabs.".into());
        c.permissions = Some(Permissions { deny: vec!["Bash(curl:*)".into()], ..Default::default() });
        c.skills.insert("notes".into(), [("SKILL.md".to_string(), "---\nname: notes\n---\n".to_string())].into());
        c.subagents.insert("reviewer".into(), "---\nname: reviewer\n---\n".into());
        write_files(&c, home.path(), None).unwrap();
        let dir = home.path().join(".claude");
        assert_eq!(std::fs::read_to_string(dir.join("CLAUDE.md")).unwrap(), "Use tabs.");
        let settings: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("settings.json")).unwrap()).unwrap();
        assert_eq!(settings, json!({"permissions": {"deny": ["Bash(curl:*)"]}}));
        assert!(dir.join("skills/notes/SKILL.md").is_file() && dir.join("agents/reviewer.md").is_file());

        let other = tempfile::tempdir().unwrap();
        let home2 = tempfile::tempdir().unwrap();
        std::fs::create_dir(home2.path().join(".claude")).unwrap();
        std::os::unix::fs::symlink(other.path().join("stolen"), home2.path().join(".claude/CLAUDE.md")).unwrap();
        assert!(write_files(&c, home2.path(), None).is_err());
        assert!(!other.path().join("stolen").exists());

        let mut remote = config();
        remote.mcp_servers =
            vec![McpServer { name: "r".into(), url: Some("https://h/mcp".into()), ..Default::default() }];
        let err = write_files(&remote, tempfile::tempdir().unwrap().path(), None).unwrap_err();
        assert!(err.to_string().contains("needs the operator's gateway"), "{err}");
    }
}
