//! `AgentTemplate`: reusable agent configuration that executions start from.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::execution::{
    AGENT_CONFIG, AGENT_CONFIG_MESSAGE, AgentSpec, BOUNDED_HOOK_TIMEOUTS, BOUNDED_IDLE_TIMEOUT, BOUNDED_TEXT,
    BOUNDED_TIMEOUT, GitAuthor, Hooks,
};

/// Settings shared by many executions. An execution's own fields win over these.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "AgentTemplate",
    namespaced,
    shortname = "at",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.agent.model"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.agent) || !has(self.agent.maxTurns) || (self.agent.maxTurns >= 1 && self.agent.maxTurns <= 10000)").message("spec.agent.maxTurns must be 1 to 10000"),
    validation = Rule::new("!has(self.agent) || !has(self.agent.maxBudgetUsd) || (self.agent.maxBudgetUsd > 0.0 && self.agent.maxBudgetUsd <= 10000.0)").message("spec.agent.maxBudgetUsd must be positive and at most 10000"),
    validation = Rule::new(BOUNDED_TEXT).message("spec.prompt is limited to 262144 characters and spec.agent.appendSystemPrompt to 65536"),
    validation = Rule::new(BOUNDED_TIMEOUT).message("spec.timeout must be a duration like 30m or 1h30m, at most 168h"),
    validation = Rule::new(BOUNDED_IDLE_TIMEOUT).message("spec.agent.idleTimeout must be a duration like 5m, at most 24h"),
    validation = Rule::new(BOUNDED_HOOK_TIMEOUTS).message("each spec.hooks.*[].timeout must be a duration like 30s, at most 1h"),
    validation = Rule::new(AGENT_CONFIG).message(AGENT_CONFIG_MESSAGE),
    validation = Rule::new("!has(self.image) || !has(self.pod) || !has(self.pod.agentImage)").message("spec.image is the deprecated name of spec.pod.agentImage: set only spec.pod.agentImage"),
)]
#[serde(rename_all = "camelCase")]
pub struct AgentTemplateSpec {
    /// Prompt used when the execution gives none. At most 262144 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub prompt: Option<String>,
    /// Default agent settings (model, limits, tools, system prompt, API key).
    #[serde(default)]
    pub agent: AgentSpec,
    /// Default wall-clock limit, e.g. `30m` (at most 168h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timeout: Option<String>,
    /// Hooks run before the execution's own hooks of the same phase.
    #[serde(default)]
    pub hooks: Hooks,
    /// Default git settings (the pull request).
    #[serde(default)]
    pub git: TemplateGit,
    /// Default commit author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<GitAuthor>,
    /// Deprecated: the same as `pod.agentImage` (the image of the agent's container only; the
    /// other steps run the operator's image). Setting both is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Pod settings of the runner pods of executions that use this template (cluster only; the
    /// agent's `env` applies on one machine too); the execution's own win field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<super::pod::PodSettings>,
    /// Where runner pods may connect besides DNS and the controller (cluster only). At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub egress: Vec<super::execution::EgressRule>,
    /// Hosts the agent's tools may reach by name through the egress proxy (see the
    /// execution's `egressHosts`). At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 261), regex(pattern = r"^(\*\.)?[A-Za-z0-9.:\[\]-]+$")))]
    pub egress_hosts: Vec<String>,
}

/// Git settings a template gives its executions.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateGit {
    /// The pull request every execution opens; each field the execution sets wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<super::execution::PullRequestSpec>,
}
