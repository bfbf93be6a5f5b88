//! What every reconcile shares: the controller's settings, its clients and caches, the
//! ledger, and the error type.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use tokio::sync::mpsc;

use super::desired::JobConfig;
use super::events::Events;
use super::executor::Executor;
use super::ledger::Ledger;
use super::metrics::Metrics;
use super::queue::Limits;
use super::reports::Reports;
use crate::api::AgentExecution;
use crate::store::{Store, StoreError};
use kube::ResourceExt;

/// A reconcile failure, with a label for the error metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot render the runner's manifest: {0}")]
    Manifest(String),
    #[error("runner: {0}")]
    Executor(String),
}

impl Error {
    /// Short label for the reconcile-errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(_) => "store",
            Error::Manifest(_) => "manifest",
            Error::Executor(_) => "executor",
        }
    }
}

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub job: JobConfig,
    pub limits: Limits,
    /// How often a Stalled execution (missing template or secret) looks again.
    pub recheck_stalled: Duration,
    /// Wait before retrying a failed reconcile (a conflict, an unreachable API server).
    pub retry_after: Duration,
    /// Timeout for executions whose spec and template set none (e.g. `1h`; None: 1h).
    pub default_timeout: Option<String>,
    /// Reconciles running at once. Bounded: after a restart with thousands of executions,
    /// unbounded concurrency holds every one's requests and objects in memory at once.
    pub concurrency: u16,
    /// Namespaces whose executions this controller serves (None: every namespace).
    pub namespaces: Option<std::collections::BTreeSet<String>>,
    /// Where the model gateway relays runner pods' requests (the Messages API).
    pub model_upstream: String,
    /// How a pull request's transient failures (429, 5xx) are retried.
    pub pull_request_retry: crate::forge::Retry,
    /// Whether remote MCP servers may be on loopback or link-local addresses (tests with servers
    /// on 127.0.0.1; never a cluster, where loopback is the controller's own ports).
    pub mcp_allow_local: bool,
    /// The time team budget periods are read from (tests move it).
    pub clock: super::budgets::Clock,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            job: JobConfig::default(),
            limits: Limits::default(),
            recheck_stalled: Duration::from_secs(10),
            retry_after: Duration::from_secs(5),
            concurrency: 16,
            default_timeout: None,
            namespaces: None,
            model_upstream: std::env::var("ANTHROPIC_BASE_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "https://api.anthropic.com".into()),
            pull_request_retry: crate::forge::Retry::default(),
            mcp_allow_local: false,
            clock: Default::default(),
        }
    }
}

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub store: Option<Store>,
    /// Every execution, as the controller's watch sees it (for queue decisions).
    pub cache: Cache<AgentExecution>,
    pub events: Events,
    pub executor: Executor,
    /// What this process keeps about each execution (started, finished, its runner's token
    /// and reports, its local process), by uid.
    pub ledger: Arc<Ledger>,
    /// Secret keys seen to exist, and when: the same Secret referenced by many executions is
    /// read once a while, not on every reconcile (only presence is kept, never the data).
    pub secrets_seen: Mutex<std::collections::HashMap<(String, String, String), std::time::Instant>>,
    /// Serialises "decide and start" so that two reconciles never take the same slot.
    pub admit: tokio::sync::Mutex<()>,
    /// Wakes one execution (a slot freed, a runner reported).
    pub wake: mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
    pub metrics: Arc<Metrics>,
    /// Live progress and final reports from runners.
    pub reports: Arc<Reports>,
    /// The cluster's AgentPolicies and the namespaces' labels.
    pub policies: super::policies::Policies,
    /// Team budgets (AgentBudget) and their gateway pools.
    pub budgets: super::budgets::Budgets,
}

/// An execution's namespace and name (the namespace `default` when it has none).
pub fn key(ax: &AgentExecution) -> (String, String) {
    (ax.namespace().unwrap_or_else(|| "default".into()), ax.name_any())
}
