//! Upper bounds on every input, in one place. `resolve` checks them with a field path; the CRD
//! mirrors each one (CEL rules and OpenAPI bounds), so `kubectl apply` rejects what
//! `agentops run` rejects. Sizes of text are in characters (Unicode code points), as the
//! apiserver counts `maxLength` and CEL `size()`.

/// A manifest file (all documents), checked before it is parsed.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// Nesting of YAML flow collections (`[[[...`), checked before parsing: the parser's own
/// recursion limit (128) answers only after time quadratic in the depth.
pub const MAX_YAML_DEPTH: usize = 64;
/// `spec.prompt` (execution or template). Larger tasks belong in a file in the repository.
pub const MAX_PROMPT_CHARS: usize = 256 * 1024;
/// `spec.agent.appendSystemPrompt`.
pub const MAX_SYSTEM_PROMPT_CHARS: usize = 64 * 1024;
/// `spec.repository.url`.
pub const MAX_URL_CHARS: usize = 2048;
/// Hooks of one phase (pre, post, onError), template and execution together.
pub const MAX_HOOKS_PER_PHASE: usize = 16;
/// Arguments of a hook's command.
pub const MAX_HOOK_ARGS: usize = 64;
/// One argument of a hook's command.
pub const MAX_HOOK_ARG_CHARS: usize = 4096;
/// Entries of `allowedTools` / `disallowedTools`.
pub const MAX_TOOL_RULES: usize = 128;
/// One entry of `allowedTools` / `disallowedTools`.
pub const MAX_TOOL_RULE_CHARS: usize = 1024;
/// `spec.agent.instructions` (the agent's CLAUDE.md).
pub const MAX_INSTRUCTIONS_CHARS: usize = 64 * 1024;
/// `spec.agent.settings.permissions` (template and execution together) as JSON: it is also one
/// argument of the CLI (`--settings`), and an argument holds at most 128 KiB.
pub const MAX_PERMISSIONS_JSON_BYTES: usize = 64 * 1024;
/// `spec.agent.mcpServers` (template and execution together), and variables of one server.
pub const MAX_MCP_SERVERS: usize = 16;
pub const MAX_MCP_ENV: usize = 64;
/// `spec.agent.skills` and `spec.agent.subagents`, each (template and execution together).
pub const MAX_SKILLS: usize = 32;
/// The files of every skill and subagent together, in bytes.
pub const MAX_AGENT_FILES_BYTES: usize = 512 * 1024;
/// `spec.egress` entries (template and execution together), and ports of one entry.
pub const MAX_EGRESS_RULES: usize = 32;
/// `egressHosts` entries, the template's and the execution's together.
pub const MAX_EGRESS_HOSTS: usize = 32;
pub const MAX_EGRESS_PORTS: usize = 16;
/// `spec.agent.outputSchema` and the output it asks for, as JSON.
pub const MAX_OUTPUT_SCHEMA_BYTES: usize = 16 * 1024;
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024;
/// `spec.git.pullRequest.title` and `.body` (templates).
pub const MAX_PR_TITLE_CHARS: usize = 1024;
pub const MAX_PR_BODY_CHARS: usize = 32 * 1024;
/// Labels, reviewers and team reviewers of a pull request, each.
pub const MAX_PR_NAMES: usize = 32;
/// `spec.timeout` (also `--default-timeout`).
pub const MAX_TIMEOUT: &str = "168h";
/// `spec.agent.idleTimeout`.
pub const MAX_IDLE_TIMEOUT: &str = "24h";
/// `spec.hooks.*[].timeout`.
pub const MAX_HOOK_TIMEOUT: &str = "1h";
/// `spec.ttlSecondsAfterFinished` (90 days).
pub const MAX_TTL_SECONDS: i64 = 90 * 24 * 3600;
/// `spec.agent.maxBudgetUsd`.
pub const MAX_BUDGET_USD: f64 = 10_000.0;
/// `spec.agent.maxTurns`.
pub const MAX_TURNS: i32 = 10_000;
/// Durations are written the way both `agentops` and the apiserver's CEL `duration()` read
/// them: integers with a unit, e.g. `90s`, `30m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,9}(ns|us|ms|s|m|h))+$";

/// A bound on a duration, as a `std::time::Duration`.
pub fn max_duration(text: &str) -> std::time::Duration {
    humantime::parse_duration(text).unwrap_or(std::time::Duration::MAX)
}
