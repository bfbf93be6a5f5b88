//! `AgentExecution`: one run of the agent on one repository.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Every field of the spec but `cancel` keeps its value (and its presence) across updates.
/// A transition rule: the apiserver checks it on updates only.
pub const IMMUTABLE_EXCEPT_CANCEL: &str = "self.repository == oldSelf.repository \
    && has(self.prompt) == has(oldSelf.prompt) && (!has(self.prompt) || self.prompt == oldSelf.prompt) \
    && has(self.templateRef) == has(oldSelf.templateRef) && (!has(self.templateRef) || self.templateRef == oldSelf.templateRef) \
    && has(self.git) == has(oldSelf.git) && (!has(self.git) || self.git == oldSelf.git) \
    && has(self.agent) == has(oldSelf.agent) && (!has(self.agent) || self.agent == oldSelf.agent) \
    && has(self.timeout) == has(oldSelf.timeout) && (!has(self.timeout) || self.timeout == oldSelf.timeout) \
    && has(self.hooks) == has(oldSelf.hooks) && (!has(self.hooks) || self.hooks == oldSelf.hooks) \
    && has(self.workspace) == has(oldSelf.workspace) && (!has(self.workspace) || self.workspace == oldSelf.workspace) \
    && has(self.ttlSecondsAfterFinished) == has(oldSelf.ttlSecondsAfterFinished) && (!has(self.ttlSecondsAfterFinished) || self.ttlSecondsAfterFinished == oldSelf.ttlSecondsAfterFinished) \
    && has(self.priority) == has(oldSelf.priority) && (!has(self.priority) || self.priority == oldSelf.priority) \
    && has(self.worker) == has(oldSelf.worker) && (!has(self.worker) || self.worker == oldSelf.worker) \
    && has(self.workItem) == has(oldSelf.workItem) && (!has(self.workItem) || self.workItem == oldSelf.workItem) \
    && has(self.pod) == has(oldSelf.pod) && (!has(self.pod) || self.pod == oldSelf.pod)";

/// Bounds of `api::limits`, as CEL rules on the spec (checked by the apiserver at `kubectl
/// apply`, and by `validate_cel` in tests that compare them with `resolve`).
pub const BOUNDED_TEXT: &str = "(!has(self.prompt) || size(self.prompt) <= 262144) \
    && (!has(self.agent) || !has(self.agent.appendSystemPrompt) || size(self.agent.appendSystemPrompt) <= 65536)";
/// `spec.agent`'s configuration: instructions within their bound, `user` among the setting
/// sources, and each MCP server either stdio (`command`) or remote (`url`).
pub const AGENT_CONFIG: &str = "!has(self.agent) || ((!has(self.agent.instructions) || size(self.agent.instructions) <= 65536) \
    && (!has(self.agent.settingSources) || self.agent.settingSources.exists(s, s == 'user')) \
    && (!has(self.agent.mcpServers) || self.agent.mcpServers.all(m, has(m.command) != has(m.url))))";
/// What `AGENT_CONFIG` asks for.
pub const AGENT_CONFIG_MESSAGE: &str = "spec.agent.instructions is limited to 65536 characters, spec.agent.settingSources must include user, and each spec.agent.mcpServers[] needs either command (stdio) or url (remote)";
/// `spec.timeout`: a plain duration (integers with units) from 1ns to 168h.
pub const BOUNDED_TIMEOUT: &str = "!has(self.timeout) || (self.timeout.matches('^([0-9]{1,9}(ns|us|ms|s|m|h))+$') \
    && duration(self.timeout) > duration('0s') && duration(self.timeout) <= duration('168h'))";
/// `spec.agent.idleTimeout`: up to 24h.
pub const BOUNDED_IDLE_TIMEOUT: &str = "!has(self.agent) || !has(self.agent.idleTimeout) \
    || (self.agent.idleTimeout.matches('^([0-9]{1,9}(ns|us|ms|s|m|h))+$') \
    && duration(self.agent.idleTimeout) > duration('0s') && duration(self.agent.idleTimeout) <= duration('24h'))";
/// Every hook's timeout: up to 1h.
pub const BOUNDED_HOOK_TIMEOUTS: &str = "!has(self.hooks) || [has(self.hooks.pre) ? self.hooks.pre : [], \
    has(self.hooks.post) ? self.hooks.post : [], has(self.hooks.onError) ? self.hooks.onError : []].all(l, l.all(h, \
    !has(h.timeout) || (h.timeout.matches('^([0-9]{1,9}(ns|us|ms|s|m|h))+$') \
    && duration(h.timeout) > duration('0s') && duration(h.timeout) <= duration('1h'))))";
/// No credentials in the URL: no userinfo, no query string, no fragment.
pub const URL_WITHOUT_CREDENTIALS: &str = "!self.repository.url.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@') \
    && !self.repository.url.contains('?') && !self.repository.url.contains('#')";
/// Every egress CIDR is an IP block with a prefix its family allows (as `resolve` checks).
pub const EGRESS_CIDRS: &str = "!has(self.egress) || self.egress.all(e, \
    e.cidr.matches('^[0-9]{1,3}([.][0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])$') \
    || e.cidr.matches('^[0-9a-fA-F.]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$'))";
/// `spec.repository.ref` has none of what git refuses in a ref name (`resolve` checks the rest).
pub const REF_NAME: &str =
    "!has(self.repository.ref) || !self.repository.ref.matches('[ :~^?*\\\\[\\\\\\\\]|[.][.]|/$')";
/// Credentials over plain http:// only to loopback, or with `insecure: true`.
pub const NO_PLAIN_HTTP_CREDENTIALS: &str = "!self.repository.url.startsWith('http://') \
    || !has(self.repository.credentialsSecretRef) \
    || (has(self.repository.insecure) && self.repository.insecure) \
    || self.repository.url.matches('^http://(localhost|127[.][0-9]+[.][0-9]+[.][0-9]+|\\\\[::1\\\\])(:[0-9]+)?([/?#]|$)')";

/// What the user asks for. Immutable after creation except `cancel`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "AgentExecution",
    namespaced,
    shortname = "ax",
    status = "AgentExecutionStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Repo","type":"string","jsonPath":".spec.repository.url","priority":1}"#,
    printcolumn = r#"{"name":"Branch","type":"string","jsonPath":".status.git.branch"}"#,
    printcolumn = r#"{"name":"Cost","type":"number","jsonPath":".status.costUsd"}"#,
    printcolumn = r#"{"name":"Tokens","type":"integer","jsonPath":".status.tokensUsed"}"#,
    printcolumn = r#"{"name":"Turns","type":"integer","jsonPath":".status.numTurns"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.duration"}"#,
    printcolumn = r#"{"name":"PR","type":"string","jsonPath":".status.git.pullRequest.url"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.prompt) || has(self.templateRef)").message("set spec.prompt, or spec.templateRef to a template that has a prompt"),
    validation = Rule::new("self.repository.url.startsWith('https://') || self.repository.url.startsWith('http://')").message("spec.repository.url must start with https:// or http://"),
    validation = Rule::new("!has(self.agent) || !has(self.agent.maxTurns) || (self.agent.maxTurns >= 1 && self.agent.maxTurns <= 10000)").message("spec.agent.maxTurns must be 1 to 10000"),
    validation = Rule::new("!has(self.agent) || !has(self.agent.maxBudgetUsd) || (self.agent.maxBudgetUsd > 0.0 && self.agent.maxBudgetUsd <= 10000.0)").message("spec.agent.maxBudgetUsd must be positive and at most 10000"),
    validation = Rule::new("!has(self.repository.depth) || self.repository.depth >= 0").message("spec.repository.depth must be 0 (full history) or more"),
    validation = Rule::new("!has(self.ttlSecondsAfterFinished) || (self.ttlSecondsAfterFinished >= 0 && self.ttlSecondsAfterFinished <= 7776000)").message("spec.ttlSecondsAfterFinished must be 0 to 7776000 (90 days)"),
    validation = Rule::new(BOUNDED_TEXT).message("spec.prompt is limited to 262144 characters and spec.agent.appendSystemPrompt to 65536"),
    validation = Rule::new(BOUNDED_TIMEOUT).message("spec.timeout must be a duration like 30m or 1h30m, at most 168h"),
    validation = Rule::new(BOUNDED_IDLE_TIMEOUT).message("spec.agent.idleTimeout must be a duration like 5m, at most 24h"),
    validation = Rule::new(BOUNDED_HOOK_TIMEOUTS).message("each spec.hooks.*[].timeout must be a duration like 30s, at most 1h"),
    validation = Rule::new(AGENT_CONFIG).message(AGENT_CONFIG_MESSAGE),
    validation = Rule::new(URL_WITHOUT_CREDENTIALS).message("spec.repository.url must not contain credentials, a query string or a fragment; use spec.repository.credentialsSecretRef"),
    validation = Rule::new(NO_PLAIN_HTTP_CREDENTIALS).message("spec.repository.url sends credentials over plain http:// to a host other than loopback: use https://, or set spec.repository.insecure: true"),
    validation = Rule::new(EGRESS_CIDRS).message("each spec.egress[].cidr must be an IP block: an IPv4 address with a prefix of at most /32, or an IPv6 one with at most /128"),
    validation = Rule::new(REF_NAME).message("spec.repository.ref must be a branch, tag, full commit id or refs/... name (no spaces, ':', '..', '~', '^', '?', '*', '[', '\\', no trailing '/')"),
    validation = Rule::new(IMMUTABLE_EXCEPT_CANCEL).message("spec is immutable after creation, except spec.cancel"),
    validation = Rule::new("!(has(oldSelf.cancel) && oldSelf.cancel) || (has(self.cancel) && self.cancel)").message("spec.cancel cannot be undone"),
)]
#[serde(rename_all = "camelCase")]
pub struct AgentExecutionSpec {
    /// The task for the agent. Required unless the template gives one. At most 262144 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub prompt: Option<String>,
    /// An `AgentTemplate` in the same namespace whose settings this execution starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// The repository to clone and push to.
    pub repository: Repository,
    /// How the operator commits and pushes the agent's changes.
    #[serde(default)]
    pub git: GitSpec,
    /// Agent settings; each one overrides the template's.
    #[serde(default)]
    pub agent: AgentSpec,
    /// Wall-clock limit for the whole execution, e.g. `30m`, `1h30m`. Default 1h, at most 168h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timeout: Option<String>,
    /// Set to true to stop the execution; usage spent so far is kept.
    #[serde(default)]
    pub cancel: bool,
    /// Commands or webhooks run around the agent.
    #[serde(default)]
    pub hooks: Hooks,
    /// Where the clone lives.
    #[serde(default)]
    pub workspace: WorkspaceSpec,
    /// Delete the resource this many seconds after it finished (the store keeps its record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Higher runs first when executions are queued.
    #[serde(default)]
    pub priority: i32,
    /// Free-form attribution: which worker asked for this execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Free-form attribution: which work item this execution serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_item: Option<String>,
    /// Where runner pods may connect besides DNS and the controller (the model and git go
    /// through the controller): e.g. package registries. Added to the template's. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub egress: Vec<EgressRule>,
    /// Hosts the agent's tools may reach by name through the operator's egress proxy, e.g.
    /// `registry.npmjs.org`, `pypi.org:443`, `*.githubusercontent.com` (port 443 unless given).
    /// The agent's `HTTPS_PROXY`/`HTTP_PROXY` point at the proxy; nothing else is reachable.
    /// Added to the template's. At most 32. `agentops run` only in this version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 261), regex(pattern = r"^(\*\.)?[A-Za-z0-9.:\[\]-]+$")))]
    pub egress_hosts: Vec<String>,
    /// Pod settings of this execution's runner pod (cluster only): each field set here wins over
    /// the template's, which wins over the controller's default. The agent's `env` applies on
    /// one machine too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<super::pod::PodSettings>,
}

/// A destination runner pods may reach: an IP block and TCP ports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EgressRule {
    /// An IPv4 or IPv6 block, e.g. `151.101.0.0/16` (NetworkPolicy has no host names).
    #[schemars(regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"), length(max = 64))]
    pub cidr: String,
    /// TCP ports (1 to 65535); at least one, at most 16.
    #[schemars(length(min = 1, max = 16), inner(range(min = 1)))]
    pub ports: Vec<u16>,
}

/// A reference to an `AgentTemplate` by name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TemplateRef {
    /// Name of the template.
    pub name: String,
}

/// A key in a Secret (on one machine: the file `<secrets-dir>/<name>/<key>`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret; each reference documents its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The repository the agent works on.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Repository {
    /// Clone URL (`https://` or `http://`). Never put a token in it: use `credentialsSecretRef`.
    #[schemars(regex(pattern = r"^(https?|file)://"), length(max = 2048))]
    pub url: String,
    /// Where the work starts: a branch, a tag (its commit), a full commit SHA, or a full ref
    /// name (`refs/...`). Default: the remote's default branch (its HEAD), whatever its name.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub git_ref: Option<String>,
    /// History depth to fetch. Default 1; 0 fetches everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub depth: Option<i32>,
    /// Secret with keys `token` (or `key`) and optional `username` (default `x-access-token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
    /// Allow credentials over plain `http://` to a host other than loopback (they cross the
    /// network unencrypted). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
    /// Who hosts the repository, for pull requests: `github` or `gitlab`. Default: from the
    /// host (`github.com`, `gitlab.com`); required for any other host (Enterprise, self-managed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// The provider's REST API root. Default `https://api.github.com`, `https://gitlab.com/api/v4`,
    /// and for another host `https://HOST/api/v3` (GitHub Enterprise) or `https://HOST/api/v4`
    /// (GitLab).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub api_url: Option<String>,
}

/// A git hosting provider whose API the operator opens pull requests with.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// GitHub (github.com or Enterprise): a pull request.
    Github,
    /// GitLab (gitlab.com or self-managed): a merge request.
    Gitlab,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
        }
    }
}

/// The pull request (GitHub) or merge request (GitLab) the operator opens after the push, with
/// the repository's credential (the agent never holds it). Each field set on the execution wins
/// over the template's. Titles and bodies are plain text with placeholders: `{{name}}`,
/// `{{namespace}}`, `{{prompt}}`, `{{result}}`, `{{summary}}`, `{{branch}}`, and
/// `{{output.FIELD}}` with `spec.agent.outputSchema`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequestSpec {
    /// Open one. Default true when this block is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Title template. Default `agentops: {{name}}`. At most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub title: Option<String>,
    /// Body template, above the generated summary of the run. Default `{{result}}`. At most
    /// 32768 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub body: Option<String>,
    /// Open it as a draft. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<bool>,
    /// Labels to set. At most 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 128)))]
    pub labels: Option<Vec<String>>,
    /// Users asked for a review (user names). At most 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 128)))]
    pub reviewers: Option<Vec<String>>,
    /// Teams asked for a review (GitHub team slugs; GitHub only). At most 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 128)))]
    pub team_reviewers: Option<Vec<String>>,
    /// The branch to merge into. Default: `git.baseBranch`, else the branch that was cloned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub base: Option<String>,
}

/// How the operator commits and pushes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSpec {
    /// Work branch to create and push. Default `agentops/<name>`. If it already exists on the
    /// remote, the execution must start from it (`repository.ref` set to it): the commit then
    /// goes on top; otherwise the run fails with reason `BranchExists` (never a force-push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Branch the work is meant to merge into (recorded for pull requests). Default: `repository.ref`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,
    /// Commit message. Default: `agentops: <name>` and the first line of the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_message: Option<String>,
    /// Commit author. Default `agentops <agentops@localhost>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<GitAuthor>,
    /// Push the work branch. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<bool>,
    /// Open a pull request (merge request) for the pushed branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PullRequestSpec>,
}

/// A commit author.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GitAuthor {
    /// Author name.
    pub name: String,
    /// Author email.
    pub email: String,
}

/// Agent settings. Each one overrides the template's.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Model name passed to Claude Code (`--model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Stop after this many agent turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_turns: Option<i32>,
    /// Stop once this many US dollars are spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_budget_usd: Option<f64>,
    /// Tools the agent may use without asking, e.g. `Write`, `Bash(git diff:*)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), inner(length(max = 1024)))]
    pub allowed_tools: Option<Vec<String>>,
    /// Tools the agent may not use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), inner(length(max = 1024)))]
    pub disallowed_tools: Option<Vec<String>>,
    /// Text appended to Claude Code's system prompt. At most 65536 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub append_system_prompt: Option<String>,
    /// Secret key holding the Anthropic API key (default key `api-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Stop the agent when it prints nothing for this long, e.g. `5m`. Default 10m, at most 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub idle_timeout: Option<String>,
    /// A JSON Schema (an object, at most 16 KiB as JSON) the agent's final answer must follow:
    /// the validated JSON lands in `status.output`. A run that ends without it, or with output
    /// that does not validate, fails with reason `InvalidOutput`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub output_schema: Option<serde_json::Value>,
    /// The team's coding instructions: the agent's user memory (`~/.claude/CLAUDE.md` in its
    /// private HOME), never written into the repository. At most 65536 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub instructions: Option<String>,
    /// The agent's user settings (`~/.claude/settings.json`): permission rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<super::AgentSettings>,
    /// Which settings the CLI reads: `[user]` (default: only what the operator writes), or with
    /// `project`/`local` also the repository's `.claude/settings.json` (its hooks run), `.mcp.json`
    /// and CLAUDE.md. A repository is input: honour it only when you trust it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 3))]
    pub setting_sources: Option<Vec<super::SettingSource>>,
    /// MCP servers: stdio (`command`) or remote (`url`, through the operator's gateway). At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub mcp_servers: Vec<super::McpServer>,
    /// Skills (`~/.claude/skills/<name>/`), inline or from a ConfigMap. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub skills: Vec<super::Skill>,
    /// Subagents (`~/.claude/agents/<name>.md`), inline or from a ConfigMap key. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub subagents: Vec<super::Subagent>,
}

/// Any JSON object, kept as written (a JSON Schema, the agent's output).
pub fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Hooks run around the agent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// Run after the clone, before the agent; any failure aborts (reason `PreHookRejected`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub pre: Vec<Hook>,
    /// Run after the agent succeeded and its work was committed; they receive the result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub post: Vec<Hook>,
    /// Run when the execution fails, times out or is cancelled; they receive the error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub on_error: Vec<Hook>,
}

/// One hook: a command run in the workspace, or a webhook that receives the execution as JSON.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// Name shown in logs. Default `<phase>-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Command and arguments, run in the workspace with the context JSON on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub command: Option<Vec<String>>,
    /// URL that receives a POST of the context JSON; a non-2xx answer is a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Limit for this hook, e.g. `30s`. Default 5m, at most 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timeout: Option<String>,
}

/// Workspace volume settings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Storage class of the workspace PVC. Empty: an emptyDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Size of the workspace volume, e.g. `10Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// What happens to the workspace when the execution ends. Default `Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<RetainPolicy>,
}

/// Workspace retention.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RetainPolicy {
    /// Remove the workspace when the execution ends.
    #[default]
    Delete,
    /// Keep the workspace.
    Retain,
    /// Keep the workspace only when the execution did not succeed.
    RetainOnFailure,
}

/// Lifecycle phase of an execution.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Accepted, not yet started.
    #[default]
    Pending,
    /// Waiting for a concurrency slot.
    Queued,
    /// The runner is working.
    Running,
    /// Finished; the work (if any) is committed and pushed.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped by `cancel`.
    Cancelled,
    /// Stopped by the timeout.
    TimedOut,
}

impl Phase {
    /// True once the execution can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled | Phase::TimedOut)
    }

    /// The name used in the store and the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Queued => "Queued",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
            Phase::TimedOut => "TimedOut",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token usage, as the Anthropic API reports it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read_input_tokens: u64,
    /// Input tokens written to the prompt cache.
    pub cache_creation_input_tokens: u64,
}

impl Usage {
    /// All tokens billed, of every kind.
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens
    }
}

/// Tool calls the agent made.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolCalls {
    /// All tool calls.
    pub total: u64,
    /// Tool calls per tool name.
    pub by_tool: BTreeMap<String, u64>,
}

impl ToolCalls {
    /// The same counts with at most `names` tool names (the most called first), each at most
    /// 64 bytes of `[A-Za-z0-9_.:-]`; every other call is counted under `other`. The total is
    /// unchanged. What an agent names its tools must not grow a report, a status or a metric
    /// without bound.
    pub fn bounded(&self, names: usize) -> ToolCalls {
        let fine = |n: &str| {
            n.len() <= 64 && n != "other" && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        };
        let mut named: Vec<(&String, u64)> =
            self.by_tool.iter().filter(|(n, _)| fine(n)).map(|(n, c)| (n, *c)).collect();
        named.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        named.truncate(names);
        let mut by_tool: BTreeMap<String, u64> = named.into_iter().map(|(n, c)| (n.clone(), c)).collect();
        let kept: u64 = by_tool.values().sum();
        let other = self.by_tool.values().sum::<u64>().saturating_sub(kept);
        if other > 0 {
            by_tool.insert("other".into(), other);
        }
        ToolCalls { total: self.total, by_tool }
    }
}

/// What the operator did in git.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitResult {
    /// The work branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The branch the work is meant to merge into (`git.baseBranch`, else the branch cloned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,
    /// The commit the work started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
    /// The commit made for the agent's changes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Whether the commit reached the remote.
    pub pushed: bool,
    /// Files added, modified or deleted.
    pub changed_files: u64,
    /// Lines added.
    pub insertions: u64,
    /// Lines removed.
    pub deletions: u64,
    /// The pull request (merge request) the operator opened or updated for the branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PullRequestResult>,
    /// Deprecated: `pullRequest.url`. Still written and read for one version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request_url: Option<String>,
}

impl GitResult {
    /// Records the pull request (and the deprecated URL field, for one version).
    pub fn set_pull_request(&mut self, p: PullRequestResult) {
        self.pull_request_url = Some(p.url.clone());
        self.pull_request = Some(p);
    }
}

/// A pull request the operator opened or updated.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequestResult {
    /// Where people see it.
    pub url: String,
    /// Its number (GitHub) or iid (GitLab).
    pub number: u64,
    /// `github` or `gitlab`.
    pub provider: String,
    /// `opened` (new) or `updated` (one was open for the branch already).
    pub state: String,
}

/// What happened: the fields `kubectl get ax` and GitOps tools read.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentExecutionStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: Phase,
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`, `Succeeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the runner started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the execution ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Run time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Run time for people, e.g. `1m 12s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// The Job running this execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// The workspace (PVC name, or directory on one machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Tokens by kind.
    #[serde(default)]
    pub usage: Usage,
    /// All tokens, of every kind.
    #[serde(default)]
    pub tokens_used: u64,
    /// Cost in US dollars, as Claude Code computes it.
    #[serde(default)]
    pub cost_usd: f64,
    /// Agent turns.
    #[serde(default)]
    pub num_turns: u64,
    /// Tool calls, total and per tool.
    #[serde(default)]
    pub tool_calls: ToolCalls,
    /// Claude Code session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The agent's final text (truncated to 4 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// The agent's structured output, validated against `spec.agent.outputSchema` (at most 16 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub output: Option<serde_json::Value>,
    /// What the operator did in git.
    #[serde(default)]
    pub git: GitResult,
    /// Machine-readable reason for the phase, e.g. `NoChanges`, `PushRejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<super::Reason>,
    /// Human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// SHA-256 of the agent's configuration this execution runs with (instructions, permission
    /// rules, setting sources, MCP servers, skills, subagents: the template's and its own, fixed
    /// when it started). Equal hashes: the same configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_config_hash: Option<String>,
    /// Calls the agent's CLI refused by its permission rules.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub permission_denials: u64,
    /// Requests the gateway relayed to each remote MCP server, by server name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mcp_requests: BTreeMap<String, u64>,
    /// What the operator's egress proxy counted for `egressHosts` (live while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<super::EgressSummary>,
    /// The cluster policies that applied and the limits this execution runs with (fixed when
    /// it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<super::PolicyRecord>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
