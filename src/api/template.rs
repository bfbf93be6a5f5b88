//! `AgentTemplate`: reusable agent configuration that executions start from.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::execution::{AgentSpec, GitAuthor, Hooks};

/// Settings shared by many executions. An execution's own fields win over these.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "AgentTemplate",
    namespaced,
    shortname = "at",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.agent.model"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentTemplateSpec {
    /// Prompt used when the execution gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Default agent settings (model, limits, tools, system prompt, API key).
    #[serde(default)]
    pub agent: AgentSpec,
    /// Default wall-clock limit, e.g. `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Hooks run before the execution's own hooks of the same phase.
    #[serde(default)]
    pub hooks: Hooks,
    /// Default commit author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<GitAuthor>,
    /// Container image for the runner pod (cluster only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}
