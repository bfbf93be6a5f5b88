//! The Kubernetes operator: reconciles `AgentExecution`s into workspaces and Jobs.

pub mod desired;
pub mod queue;
pub mod status;
