//! The resources users apply: `AgentExecution` and `AgentTemplate` (`agentops.dev/v1alpha1`).

pub mod agent_config;
pub mod budget;
pub mod contract;
mod execution;
pub mod limits;
mod manifest;
pub mod output;
pub mod pod;
pub mod policy;
pub mod pull_request;
mod reason;
pub mod report;
mod resolve;
mod template;
pub mod text;

pub use agent_config::{
    AgentConfig, AgentConfigRecord, AgentSettings, ConfigMapKeyRef, ConfigMapRef, McpHeader, McpServer, McpTransport,
    PermissionMode, Permissions, SettingSource, Skill, Subagent,
};
pub use budget::{AgentBudget, AgentBudgetSpec, AgentBudgetStatus};
pub use execution::*;
pub use manifest::{Manifest, ManifestError, parse_manifest, parse_policies};
pub use pod::PodSettings;
pub use policy::{AgentPolicy, AgentPolicySpec, AgentPolicyStatus, PolicyRecord};
pub use pull_request::ResolvedPullRequest;
pub use reason::Reason;
pub use report::{EgressSummary, Summary};
pub use resolve::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_TIMEOUT, HookAction, Resolved, ResolvedHook, is_plain_duration, resolve,
};
pub use template::{AgentTemplate, AgentTemplateSpec, TemplateGit};

/// `apiVersion` of both resources.
pub const API_VERSION: &str = "agentops.dev/v1alpha1";
