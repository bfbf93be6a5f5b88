//! Prometheus metrics of the controller (prometheus-client, the official Rust client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub namespace: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub namespace: String,
    pub model: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    pub tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    pub namespace: String,
    /// `allowed` or `refused` (connections); `out` or `in` (bytes).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabel {
    pub budget: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    pub registry: Registry,
    /// Executions per phase (set at each scrape from the watch cache).
    pub executions: Family<PhaseLabel, Gauge>,
    pub queue_depth: Gauge,
    pub queue_wait_seconds: Histogram,
    pub duration_seconds: Histogram,
    pub finished: Family<PhaseLabel, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost_usd: Family<UsageLabels, Counter<f64, AtomicU64>>,
    pub tool_calls: Family<ToolLabel, Counter>,
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    /// Reconciles run (of live executions and finished ones).
    pub reconciles: Counter,
    /// Connections through the egress proxy, by namespace and `allowed`/`refused`.
    pub egress_connections: Family<EgressLabels, Counter>,
    /// Bytes through the egress proxy, by namespace and direction (`result`: `out`, `in`).
    pub egress_bytes: Family<EgressLabels, Counter>,
    /// Executions an AgentPolicy refused, by policy.
    pub policy_refusals: Family<PolicyLabel, Counter>,
    /// Team budgets: spent this period, the limit, and when the period resets (Unix seconds).
    pub budget_spent_usd: Family<BudgetLabel, Gauge<f64, AtomicU64>>,
    pub budget_limit_usd: Family<BudgetLabel, Gauge<f64, AtomicU64>>,
    pub budget_resets_at: Family<BudgetLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentops");
        let m = Self {
            executions: Family::default(),
            queue_depth: Gauge::default(),
            queue_wait_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            duration_seconds: Histogram::new(exponential_buckets(5.0, 2.0, 12)),
            finished: Family::default(),
            tokens: Family::default(),
            cost_usd: Family::default(),
            tool_calls: Family::default(),
            reconcile_errors: Family::default(),
            reconciles: Counter::default(),
            egress_connections: Family::default(),
            egress_bytes: Family::default(),
            policy_refusals: Family::default(),
            budget_spent_usd: Family::default(),
            budget_limit_usd: Family::default(),
            budget_resets_at: Family::default(),
            registry: Registry::default(),
        };
        registry.register("executions", "Executions by phase", m.executions.clone());
        registry.register("queue_depth", "Executions waiting for a slot", m.queue_depth.clone());
        registry.register("queue_wait_seconds", "Time from creation to start", m.queue_wait_seconds.clone());
        registry.register("execution_duration_seconds", "Run time of finished executions", m.duration_seconds.clone());
        registry.register("executions_finished", "Executions that ended, by phase", m.finished.clone());
        registry.register("tokens", "Tokens used, by namespace, model and kind", m.tokens.clone());
        registry.register("cost_usd", "Cost in US dollars, by namespace and model", m.cost_usd.clone());
        registry.register("tool_calls", "Agent tool calls, by tool", m.tool_calls.clone());
        registry.register("reconcile_errors", "Reconcile failures, by kind", m.reconcile_errors.clone());
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "egress_connections",
            "Connections of agents through the egress proxy, by namespace and result (allowed, refused)",
            m.egress_connections.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes through the egress proxy, by namespace and direction (result: out, in)",
            m.egress_bytes.clone(),
        );
        registry.register("policy_refusals", "Executions refused by an AgentPolicy", m.policy_refusals.clone());
        registry.register(
            "team_budget_spent_usd",
            "Team budget spent this period, by AgentBudget",
            m.budget_spent_usd.clone(),
        );
        registry.register("team_budget_limit_usd", "Team budget limit, by AgentBudget", m.budget_limit_usd.clone());
        registry.register(
            "team_budget_resets_at_seconds",
            "When the team budget's period resets (Unix time), by AgentBudget",
            m.budget_resets_at.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Claude Code's built-in tools: the only tool names that become metric label values.
const BUILTIN_TOOLS: &[&str] = &[
    "Bash",
    "BashOutput",
    "Edit",
    "ExitPlanMode",
    "Glob",
    "Grep",
    "KillShell",
    "LS",
    "MultiEdit",
    "NotebookEdit",
    "Read",
    "Skill",
    "SlashCommand",
    "Task",
    "TodoWrite",
    "WebFetch",
    "WebSearch",
    "Write",
];

/// Counts a finished execution: its phase, duration, tokens, cost and tool calls.
pub fn record_finished(
    m: &Metrics,
    r: &crate::api::Resolved,
    phase: crate::api::Phase,
    st: &crate::api::AgentExecutionStatus,
) {
    m.finished.get_or_create(&PhaseLabel { phase: phase.as_str().into() }).inc();
    if let Some(ms) = st.duration_ms {
        m.duration_seconds.observe(ms as f64 / 1000.0);
    }
    let model = r.model.clone().unwrap_or_else(|| "default".into());
    let ns = r.namespace.clone();
    for (kind, n) in [
        ("input", st.usage.input_tokens),
        ("output", st.usage.output_tokens),
        ("cache_read", st.usage.cache_read_input_tokens),
        ("cache_creation", st.usage.cache_creation_input_tokens),
    ] {
        m.tokens
            .get_or_create(&TokenLabels { namespace: ns.clone(), model: model.clone(), kind: kind.into() })
            .inc_by(n);
    }
    if let Some(e) = &st.egress {
        let label = |result: &str| EgressLabels { namespace: ns.clone(), result: result.into() };
        m.egress_connections.get_or_create(&label("allowed")).inc_by(e.connections);
        m.egress_connections.get_or_create(&label("refused")).inc_by(e.refused);
        m.egress_bytes.get_or_create(&label("out")).inc_by(e.bytes_out);
        m.egress_bytes.get_or_create(&label("in")).inc_by(e.bytes_in);
    }
    m.cost_usd.get_or_create(&UsageLabels { namespace: ns, model }).inc_by(st.cost_usd);
    // Label values from a fixed set: Claude Code's own tools by name, anything else `other`
    // (tool names are the agent's to choose, and every new label value is a new series).
    for (tool, n) in &st.tool_calls.by_tool {
        let tool = if BUILTIN_TOOLS.contains(&tool.as_str()) { tool.as_str() } else { "other" };
        m.tool_calls.get_or_create(&ToolLabel { tool: tool.into() }).inc_by(*n);
    }
}
