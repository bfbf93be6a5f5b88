//! What a run did: the one report type. `agentops run -o json`, `executions list|show --json`,
//! the controller's HTTP API, the hooks' payloads, the runner's reports and termination
//! message all carry this shape (camelCase, usage and git nested); the store's rows and the
//! status are built from it. Also the exit status each outcome maps to.

use serde::{Deserialize, Serialize};

use super::{GitResult, Phase, Reason, ToolCalls, Usage};

/// Exit status: the execution succeeded (including "no changes").
pub const EXIT_SUCCEEDED: i32 = 0;
/// Exit status: the execution failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit status: the manifest, a secret or an option is invalid; nothing was run.
pub const EXIT_INVALID: i32 = 2;
/// Exit status: the timeout stopped the execution.
pub const EXIT_TIMED_OUT: i32 = 3;
/// Exit status: the execution was cancelled (Ctrl-C / SIGTERM).
pub const EXIT_CANCELLED: i32 = 4;

/// Everything an execution produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Summary {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub phase: Phase,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub start_time: Option<String>,
    pub completion_time: Option<String>,
    pub duration_ms: u64,
    pub tokens_used: u64,
    pub usage: Usage,
    pub cost_usd: f64,
    pub num_turns: u64,
    pub tool_calls: ToolCalls,
    pub session_id: Option<String>,
    pub result: Option<String>,
    /// The agent's structured output (`spec.agent.outputSchema`), validated.
    pub output: Option<serde_json::Value>,
    /// The model the agent used, as it said.
    pub model: Option<String>,
    pub api_retries: u64,
    pub git: GitResult,
    pub workspace: Option<String>,
    /// The agent's configuration that ran: names, counts and its hash (never a Secret's value).
    pub agent_config: Option<super::AgentConfigRecord>,
    /// Calls the CLI refused by its permission rules, as the agent reported them.
    pub permission_denials: u64,
    /// Requests the gateway relayed to each remote MCP server (the operator's count).
    pub mcp_requests: std::collections::BTreeMap<String, u64>,
    /// What the egress proxy counted (`spec.egressHosts`; None without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSummary>,
}

/// The connections the agent's tools made through the egress proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressSummary {
    /// Connections made to allowed hosts.
    pub connections: u64,
    /// Connections refused (a host or port not allowed, a private address, too many at once).
    pub refused: u64,
    /// Bytes from the agent to the hosts.
    pub bytes_out: u64,
    /// Bytes from the hosts to the agent.
    pub bytes_in: u64,
    /// `host:port` of the latest refusals (at most 20, each once).
    pub refused_hosts: Vec<String>,
}

impl Summary {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self.phase {
            Phase::Succeeded => EXIT_SUCCEEDED,
            Phase::TimedOut => EXIT_TIMED_OUT,
            Phase::Cancelled => EXIT_CANCELLED,
            _ => EXIT_FAILED,
        }
    }

    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut s = format!(
            "{} {} ({}){}\n",
            self.phase,
            self.name,
            self.reason.as_deref().unwrap_or("-"),
            self.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
        );
        s += &format!("  id        {}\n", self.id);
        s += &format!(
            "  usage     {} tokens (in {}, out {}, cache read {}, cache write {}), ${:.4}, {} turns\n",
            self.tokens_used,
            self.usage.input_tokens,
            self.usage.output_tokens,
            self.usage.cache_read_input_tokens,
            self.usage.cache_creation_input_tokens,
            self.cost_usd,
            self.num_turns
        );
        let tools: Vec<String> = self.tool_calls.by_tool.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        s += &format!("  tools     {} {}\n", self.tool_calls.total, tools.join(" "));
        if let Some(b) = &self.git.branch {
            s += &format!(
                "  git       {} {} {} ({} files, +{} -{})\n",
                b,
                self.git.commit.as_deref().map(|c| &c[..c.len().min(12)]).unwrap_or("no commit"),
                if self.git.pushed { "pushed" } else { "not pushed" },
                self.git.changed_files,
                self.git.insertions,
                self.git.deletions
            );
        }
        if let Some(p) = &self.git.pull_request {
            s += &format!("  pull req  #{} {} ({}, {})\n", p.number, p.url, p.provider, p.state);
        }
        if let Some(c) = &self.agent_config {
            s += &format!("  config    {}{}\n", &c.hash[..c.hash.len().min(12)], config_line(c));
        }
        if self.permission_denials > 0 {
            s += &format!("  refused   {} calls (permission rules)\n", self.permission_denials);
        }
        if let Some(o) = &self.output {
            s += &format!("  output    {}\n", truncate(&o.to_string(), 200));
        }
        s += &format!("  duration  {:.1}s\n", self.duration_ms as f64 / 1000.0);
        if let Some(w) = &self.workspace {
            let gone = if std::path::Path::new(w).exists() { "" } else { " (removed)" };
            s += &format!("  workspace {w}{gone}\n");
        }
        // Names, messages, tool names and the output come from the agent, a git host or a forge.
        super::text::clean(&s).into_owned()
    }
}

/// What an agent configuration holds, in a few words.
fn config_line(c: &super::AgentConfigRecord) -> String {
    let mut parts = Vec::new();
    if c.instructions_chars > 0 {
        parts.push(format!("instructions ({} chars)", c.instructions_chars));
    }
    if let Some(p) = &c.permissions {
        let mode = p.default_mode.as_deref().map(|m| format!(", mode {m}")).unwrap_or_default();
        parts.push(format!("rules {} allow / {} deny / {} ask{mode}", p.allow, p.deny, p.ask));
    }
    for (what, tools) in [("allowedTools", &c.allowed_tools), ("disallowedTools", &c.disallowed_tools)] {
        if !tools.is_empty() {
            parts.push(format!("{what} {}", tools.join(",")));
        }
    }
    if !c.permission_mode.is_empty() {
        parts.push(format!("permission mode {}", c.permission_mode));
    }
    parts.push(format!("sources {}", c.setting_sources.join(",")));
    for (what, names) in [("mcp", &c.mcp_servers), ("skills", &c.skills), ("subagents", &c.subagents)] {
        if !names.is_empty() {
            parts.push(format!("{what} {}", names.join(",")));
        }
    }
    format!(" · {}", parts.join(" · "))
}

/// Truncates text to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [truncated]", &text[..end])
}

/// What a real node keeps of a runner container's termination message: the kubelet reads the
/// last 4096 bytes of the file, and its status manager keeps the first 12 KiB ÷ (containers +
/// init containers) of that: 3072 bytes in the runner pod's four (`desired` checks the count).
/// The whole report (the final text, every tool's count, the structured output) reaches the
/// controller with the publish step's report; this is what survives without it.
pub const TERMINATION_MESSAGE_LIMIT: usize = 12 * 1024 / RUNNER_CONTAINERS;

/// Containers of a runner pod (clone, agent, publish, finish); one more (the bundle's init
/// container) when the agent runs in a team's image: the Job tells each step the count
/// (`AGENTOPS_POD_CONTAINERS`).
pub const RUNNER_CONTAINERS: usize = 4;

/// What a node keeps of a termination message in a pod of `containers` (init ones included).
pub fn termination_message_limit(containers: usize) -> usize {
    12 * 1024 / containers.max(1)
}

/// The summary as JSON that fits a termination message of the runner pod of four.
pub fn termination_message(s: &Summary) -> String {
    termination_message_within(s, TERMINATION_MESSAGE_LIMIT)
}

/// The summary as JSON in at most `limit` bytes: the final text is shortened first, then
/// dropped, so the usage and git figures always arrive.
pub fn termination_message_within(s: &Summary, limit: usize) -> String {
    let mut s = s.clone();
    // Bounded whatever the agent did: 16 names of at most 64 bytes (the full counts go to the
    // report endpoint).
    s.tool_calls = s.tool_calls.bounded(16);
    // The structured output (up to 16 KiB) reaches the controller with the publish step's report.
    if serde_json::to_string(&s).map_or(0, |t| t.len()) > limit {
        s.output = None;
    }
    for keep in [1024usize, 256, 0] {
        let text = serde_json::to_string(&s).unwrap_or_default();
        if text.len() <= limit {
            return text;
        }
        s.result = s.result.as_deref().filter(|_| keep > 0).map(|r| truncate(r, keep));
        s.message = s.message.as_deref().map(|m| truncate(m, 512));
    }
    serde_json::to_string(&s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kubelet's status manager keeps: 12 KiB ÷ (containers + init containers).
    #[test]
    fn the_limit_follows_the_pods_container_count() {
        assert_eq!(termination_message_limit(RUNNER_CONTAINERS), 3072);
        assert_eq!(termination_message_limit(5), 2457);
        let s = Summary { result: Some("r".repeat(100_000)), message: Some("m".repeat(10_000)), ..Default::default() };
        for containers in [4usize, 5] {
            let limit = termination_message_limit(containers);
            let text = termination_message_within(&s, limit);
            assert!(text.len() <= limit, "{containers}: {} bytes", text.len());
            let back: Summary = serde_json::from_str(&text).unwrap();
            assert!(back.result.is_some_and(|r| r.starts_with("rrr")), "the text shortened, not lost");
        }
    }

    #[test]
    fn a_termination_message_fits_whatever_the_agent_named_its_tools() {
        for name_len in [20usize, 60, 200] {
            let mut s = Summary { result: Some("r".repeat(100_000)), ..Default::default() };
            for i in 0..500 {
                let name = format!("{i:03}{}", "t".repeat(name_len));
                s.tool_calls.by_tool.insert(name, 2);
                s.tool_calls.total += 2;
            }
            let text = termination_message(&s);
            assert!(text.len() <= TERMINATION_MESSAGE_LIMIT, "{name_len}: {} bytes", text.len());
            let back: Summary = serde_json::from_str(&text).unwrap();
            assert_eq!(back.tool_calls.total, 1000);
            assert_eq!(back.tool_calls.by_tool.values().sum::<u64>(), 1000, "nothing lost, the rest is `other`");
            assert!(back.tool_calls.by_tool.len() <= 17);
            assert!(back.tool_calls.by_tool.keys().all(|k| k.len() <= 64));
        }
    }
}
