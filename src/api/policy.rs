//! `AgentPolicy`: the platform team's layer under every template and execution of the
//! namespaces it selects. Defaults fill what neither the template nor the execution sets;
//! maximums and allowlists refuse (never clamp) what asks for more, naming the policy and the
//! field. Several policies selecting one namespace combine to the strictest. Pure: the
//! controller and `agentops run --policy FILE` call these functions with what they read.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::execution::EgressRule;
use super::limits;
use super::{AgentExecution, AgentTemplate, ManifestError, PodSettings, Resolved};
use crate::gateway::egress::{CidrRule, HostRule};

/// Cluster-wide defaults, maximums and allowlists for the executions of the namespaces it selects.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    status = "AgentPolicyStatus",
    shortname = "apol",
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.namespaceCount"}"#,
    printcolumn = r#"{"name":"Refused","type":"integer","jsonPath":".status.refused"}"#,
    printcolumn = r#"{"name":"Max-Budget","type":"number","jsonPath":".spec.maximums.maxBudgetUsd"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicySpec {
    /// The namespaces this policy applies to (labels of the Namespace objects). Absent: every
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Values for what neither the template nor the execution sets.
    #[serde(default)]
    pub defaults: PolicyDefaults,
    /// The most an execution may ask for. An execution that asks for more is refused.
    #[serde(default)]
    pub maximums: PolicyMaximums,
    /// What an execution may name. A list absent: anything; empty: nothing.
    #[serde(default)]
    pub allowed: PolicyAllowed,
    /// Company-wide instructions appended to every agent's instructions (its CLAUDE.md).
    /// At most 65536 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub instructions: Option<String>,
}

/// Defaults under the template's values.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_budget_usd: Option<f64>,
    /// e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_turns: Option<i32>,
    /// Pod settings under the template's (field by field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodSettings>,
    /// IP blocks every runner pod may reach, added to the template's and the execution's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub egress: Vec<EgressRule>,
    /// Hosts every agent may reach through the egress proxy, added to the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 261)))]
    pub egress_hosts: Vec<String>,
}

/// The most an execution may ask for.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMaximums {
    /// The largest `maxBudgetUsd`; an execution that sets none gets this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_budget_usd: Option<f64>,
    /// The longest `timeout`, e.g. `4h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timeout: Option<String>,
    /// The most `maxTurns`; an execution that sets none gets this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_turns: Option<i32>,
}

/// Allowlists. Absent: anything; an empty list: nothing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAllowed {
    /// Model names (`claude-sonnet-4-6`), or prefixes ending in `*` (`claude-haiku-*`). The
    /// gateway refuses requests naming another model too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 128)))]
    pub models: Option<Vec<String>>,
    /// Agent images (`pod.agentImage`): a registry (`registry.example.com`), a repository
    /// (`registry.example.com/team/toolchain`, any tag or digest) or an exact reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub agent_images: Option<Vec<String>>,
    /// IP blocks (with ports; none: any port) every `egress` rule must fall inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub egress: Option<Vec<PolicyCidr>>,
    /// Host rules every `egressHosts` entry must fall under (`*.example.com` covers
    /// `a.example.com` and `*.a.example.com`, on the same port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 261)))]
    pub egress_hosts: Option<Vec<String>>,
    /// Whether executions may run under a controller's local executor (processes on its node).
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_executor: Option<bool>,
    /// Whether `spec.repository.insecure` (plain HTTP to another machine) is allowed. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_repositories: Option<bool>,
}

/// An IP block and, optionally, its ports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PolicyCidr {
    #[schemars(regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"), length(max = 64))]
    pub cidr: String,
    /// Ports (none: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<u16>,
}

/// What the controller observed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// The namespaces it selects (the first 256 by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub namespace_count: u64,
    /// Executions it refused since it was created.
    #[serde(default)]
    pub refused: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Why the policy cannot be applied (a bad selector or value), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the policies decided for one execution (`status.policy`): their names and the limits
/// it runs with.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRecord {
    /// The policies that applied, by name.
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    /// e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The models the gateway lets the agent name (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
}

/// The label every Namespace carries with its own name (Kubernetes sets it).
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Whether `policy` selects a namespace with these labels. Err: its selector is not valid.
pub fn selects(policy: &AgentPolicy, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let Some(sel) = &policy.spec.namespace_selector else { return Ok(true) };
    let sel = Selector::try_from(sel.clone()).map_err(|e| format!("spec.namespaceSelector: {e}"))?;
    Ok(sel.matches(labels))
}

/// The policies selecting a namespace, by name (a policy with a bad selector selects every
/// namespace: it refuses rather than fail open).
pub fn selecting<'a>(policies: &'a [AgentPolicy], labels: &BTreeMap<String, String>) -> Vec<&'a AgentPolicy> {
    let mut out: Vec<&AgentPolicy> = policies.iter().filter(|p| selects(p, labels).unwrap_or(true)).collect();
    out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out
}

fn name(p: &AgentPolicy) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Fills what neither the execution nor its template sets with the policies' defaults (the
/// first policy by name that sets one; numbers: the smallest; lists: added), and appends their
/// instructions. `template` is the execution's, as the runner will read it.
pub fn apply_defaults(ax: &mut AgentExecution, template: Option<&AgentTemplate>, policies: &[&AgentPolicy]) {
    if policies.is_empty() {
        return;
    }
    let t = template.map(|t| &t.spec);
    let spec = &mut ax.spec;
    let first = |f: &dyn Fn(&AgentPolicy) -> Option<String>| policies.iter().find_map(|p| f(p));
    if spec.agent.model.is_none() && t.is_none_or(|t| t.agent.model.is_none()) {
        spec.agent.model = first(&|p| p.spec.defaults.model.clone());
    }
    let smallest_f = |f: &dyn Fn(&AgentPolicy) -> Option<f64>| {
        policies.iter().filter_map(|p| f(p)).filter(|v| v.is_finite()).reduce(f64::min)
    };
    if spec.agent.max_budget_usd.is_none() && t.is_none_or(|t| t.agent.max_budget_usd.is_none()) {
        // A maximum with no default is the default: an execution that sets nothing is bounded.
        // Under several policies, never above the smallest maximum.
        let default = smallest_f(&|p| p.spec.defaults.max_budget_usd);
        let max = smallest_f(&|p| p.spec.maximums.max_budget_usd);
        spec.agent.max_budget_usd = match (default, max) {
            (Some(d), Some(m)) => Some(d.min(m)),
            (d, m) => d.or(m),
        };
    }
    if spec.agent.max_turns.is_none() && t.is_none_or(|t| t.agent.max_turns.is_none()) {
        let smallest = |f: &dyn Fn(&AgentPolicy) -> Option<i32>| policies.iter().filter_map(|p| f(p)).min();
        let (default, max) = (smallest(&|p| p.spec.defaults.max_turns), smallest(&|p| p.spec.maximums.max_turns));
        spec.agent.max_turns = match (default, max) {
            (Some(d), Some(m)) => Some(d.min(m)),
            (d, m) => d.or(m),
        };
    }
    if spec.timeout.is_none() && t.is_none_or(|t| t.timeout.is_none()) {
        // The shortest default, never above a maximum (a maximum alone is the default only when
        // it is below the built-in 1h; otherwise the cluster's default applies, checked against it).
        let shortest = |f: &dyn Fn(&AgentPolicy) -> Option<String>| {
            policies.iter().filter_map(|p| f(p)).min_by_key(|d| parse(d).unwrap_or(Duration::MAX))
        };
        let default = shortest(&|p| p.spec.defaults.timeout.clone());
        let max = shortest(&|p| p.spec.maximums.timeout.clone());
        spec.timeout = match (default, max) {
            (Some(d), Some(m)) if parse(&m) < parse(&d) => Some(m),
            (None, Some(m)) if parse(&m).is_some_and(|m| m < super::DEFAULT_TIMEOUT) => Some(m),
            (d, _) => d,
        };
    }
    // Pod settings: the policies' under the template's and the execution's (the first policy by
    // name winning field by field), folded into the execution's own so that the runner's manifest
    // carries them.
    let mut pod = PodSettings::default();
    for p in policies.iter().rev() {
        if let Some(d) = &p.spec.defaults.pod {
            pod = pod.merged(d);
        }
    }
    if pod != PodSettings::default() {
        if let Some(tp) = t.and_then(|t| t.pod.as_ref()) {
            pod = pod.merged(tp);
        }
        if let Some(own) = &spec.pod {
            pod = pod.merged(own);
        }
        spec.pod = Some(pod);
    }
    for p in policies {
        for rule in &p.spec.defaults.egress {
            if !spec.egress.contains(rule) {
                spec.egress.push(rule.clone());
            }
        }
        for host in &p.spec.defaults.egress_hosts {
            if !spec.egress_hosts.contains(host) {
                spec.egress_hosts.push(host.clone());
            }
        }
    }
    let company: Vec<&str> = policies.iter().filter_map(|p| p.spec.instructions.as_deref()).collect();
    if !company.is_empty() {
        let own = spec.agent.instructions.clone().or_else(|| t.and_then(|t| t.agent.instructions.clone()));
        let mut text = own.unwrap_or_default();
        for c in company {
            if !text.is_empty() {
                text.push_str("\n\n");
            }
            text.push_str(c);
        }
        spec.agent.instructions = Some(text);
    }
}

/// A started execution runs with the limits recorded when it started (the controller's store,
/// or `status.policy` without one): they are put back into its spec before it is resolved
/// again (after a restart, for its gateway); the caller sets `Resolved::policy` to the record.
pub fn freeze(ax: &mut AgentExecution, record: Option<&PolicyRecord>) {
    let Some(record) = record.cloned() else { return };
    let spec = &mut ax.spec;
    if record.model.is_some() {
        spec.agent.model = record.model;
    }
    if record.max_budget_usd.is_some() {
        spec.agent.max_budget_usd = record.max_budget_usd;
    }
    if let Some(n) = record.max_turns {
        spec.agent.max_turns = i32::try_from(n).ok();
    }
    if record.timeout.is_some() {
        spec.timeout = record.timeout;
    }
}

/// A duration as `resolve` reads it back (`1h30m`).
fn plain(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn parse(d: &str) -> Option<Duration> {
    humantime::parse_duration(d.trim()).ok()
}

/// Checks a resolved execution against every maximum and allowlist of the policies. Err names
/// the policy and the field, and says what to do. `local_executor`: whether it would run under
/// a local executor.
pub fn check(r: &Resolved, policies: &[&AgentPolicy], local_executor: bool) -> Result<PolicyRecord, ManifestError> {
    let mut record = PolicyRecord {
        policies: policies.iter().map(|p| name(p)).collect(),
        model: r.model.clone(),
        max_budget_usd: r.max_budget_usd,
        max_turns: r.max_turns,
        timeout: Some(plain(r.timeout)),
        models: None,
    };
    for p in policies {
        let who = format!("AgentPolicy {:?}", name(p));
        let refuse = |field: &str, what: String| {
            ManifestError::new(
                field,
                format!("{what}, which {who} does not allow; ask for less, or ask your platform team"),
            )
        };
        let m = &p.spec.maximums;
        if let Some(max) = m.max_budget_usd {
            match r.max_budget_usd {
                None => return Err(refuse("spec.agent.maxBudgetUsd", format!("is not set (no limit), above ${max}"))),
                Some(b) if b > max => return Err(refuse("spec.agent.maxBudgetUsd", format!("is ${b}, above ${max}"))),
                _ => {}
            }
        }
        if let Some(max) = m.max_turns {
            match r.max_turns {
                None => return Err(refuse("spec.agent.maxTurns", format!("is not set (no limit), above {max}"))),
                Some(n) if i64::from(n) > i64::from(max) => {
                    return Err(refuse("spec.agent.maxTurns", format!("is {n}, above {max}")));
                }
                _ => {}
            }
        }
        if let Some(max) = &m.timeout {
            let Some(limit) = parse(max).filter(|d| !d.is_zero()) else {
                return Err(ManifestError::new(
                    "spec.timeout",
                    format!(
                        "{who} has spec.maximums.timeout {max:?}, which is not a duration; ask your platform team to fix it"
                    ),
                ));
            };
            if r.timeout > limit {
                let asked = humantime::format_duration(r.timeout);
                return Err(refuse("spec.timeout", format!("is {asked}, above {max}")));
            }
        }
        let a = &p.spec.allowed;
        if let Some(models) = &a.models {
            match &r.model {
                None => {
                    return Err(refuse(
                        "spec.agent.model",
                        format!("is not set (the CLI's default model); set one of {}", models.join(", ")),
                    ));
                }
                Some(model) if !models.iter().any(|m| model_allowed(m, model)) => {
                    return Err(refuse("spec.agent.model", format!("is {model:?}, not one of {}", models.join(", "))));
                }
                _ => {}
            }
            record.models = Some(match record.models.take() {
                // Several lists: a model must pass each; the gateway checks them all.
                Some(mut have) => {
                    have.extend(models.iter().map(|m| format!("{}{m}", policy_tag(p))));
                    have
                }
                None => models.iter().map(|m| format!("{}{m}", policy_tag(p))).collect(),
            });
        }
        if let Some(images) = &a.agent_images
            && let Some(image) = &r.pod.agent_image
            && !images.iter().any(|allowed| image_allowed(allowed, image))
        {
            return Err(refuse("spec.pod.agentImage", format!("is {image:?}, not from {}", images.join(", "))));
        }
        if let Some(blocks) = &a.egress {
            let allowed: Vec<CidrRule> =
                blocks.iter().filter_map(|b| CidrRule::parse(&b.cidr, b.ports.clone()).ok()).collect();
            for (i, rule) in r.egress.iter().enumerate() {
                let ok = CidrRule::parse(&rule.cidr, rule.ports.clone())
                    .is_ok_and(|want| allowed.iter().any(|a| a.covers(&want)));
                if !ok {
                    let ports: Vec<String> = rule.ports.iter().map(|p| p.to_string()).collect();
                    return Err(refuse(
                        &format!("spec.egress[{i}]"),
                        format!("opens {} ports {}", rule.cidr, ports.join(",")),
                    ));
                }
            }
        }
        // An address written as a host is an IP block of one address: `allowed.egress` bounds it
        // too (else any private address could be named as a host).
        if let Some(blocks) = &a.egress {
            let allowed: Vec<CidrRule> =
                blocks.iter().filter_map(|b| CidrRule::parse(&b.cidr, b.ports.clone()).ok()).collect();
            for (i, rule) in r.egress_hosts.iter().enumerate() {
                let Ok(ip) = rule.host.parse::<std::net::IpAddr>() else { continue };
                let one = CidrRule { net: ip, prefix: if ip.is_ipv4() { 32 } else { 128 }, ports: vec![rule.port] };
                if !allowed.iter().any(|a| a.covers(&one)) {
                    return Err(refuse(
                        &format!("spec.egressHosts[{i}]"),
                        format!("opens the address {}:{} (outside allowed.egress)", rule.host, rule.port),
                    ));
                }
            }
        }
        if let Some(hosts) = &a.egress_hosts {
            let allowed: Vec<HostRule> = hosts.iter().filter_map(|h| HostRule::parse(h).ok()).collect();
            for (i, rule) in r.egress_hosts.iter().enumerate() {
                if !allowed.iter().any(|a| a.covers(rule)) {
                    return Err(refuse(
                        &format!("spec.egressHosts[{i}]"),
                        format!("opens {}:{}", rule.host, rule.port),
                    ));
                }
            }
        }
        if a.local_executor == Some(false) && local_executor {
            return Err(ManifestError::new(
                "spec",
                format!(
                    "would run under the controller's local executor (a process on its node), which {who} does not allow; ask your platform team to run the controller with --executor job"
                ),
            ));
        }
        if a.insecure_repositories == Some(false) && r.repo_insecure {
            return Err(refuse("spec.repository.insecure", "is true (plain HTTP to another machine)".into()));
        }
    }
    Ok(record)
}

/// `policy:` prefix kept on each model pattern so that the gateway can require one match per
/// policy (`name\u{1f}pattern`).
fn policy_tag(p: &AgentPolicy) -> String {
    format!("{}\u{1f}", name(p))
}

/// Whether a model passes every policy's list (patterns tagged by `check`): for each policy
/// that has a list, one of its patterns matches.
pub fn models_allow(tagged: &[String], model: &str) -> bool {
    let mut by_policy: BTreeMap<&str, bool> = BTreeMap::new();
    for t in tagged {
        let (policy, pattern) = t.split_once('\u{1f}').unwrap_or(("", t.as_str()));
        let ok = by_policy.entry(policy).or_insert(false);
        *ok |= model_allowed(pattern, model);
    }
    by_policy.values().all(|ok| *ok)
}

/// The models a record allows, for people (untagged, deduplicated).
pub fn models_shown(tagged: &[String]) -> Vec<String> {
    let mut out: Vec<String> =
        tagged.iter().map(|t| t.split_once('\u{1f}').map(|(_, m)| m).unwrap_or(t).to_string()).collect();
    out.sort();
    out.dedup();
    out
}

fn model_allowed(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// Whether `image` is one `allowed` names:
/// - a registry (`registry.example.com`, `registry.example.com:5000`, `localhost`): any image
///   under it (`registry.example.com/...`, never `registry.example.com:tag`, which runtimes
///   read as a Docker Hub name);
/// - a repository (`registry.example.com/team/tool`, `golang`): any tag or digest of it;
/// - a reference with a tag or digest (`registry.example.com/team/tool:1.0`, `golang:1.23`):
///   only itself (a digest added to a tag would replace it).
fn image_allowed(allowed: &str, image: &str) -> bool {
    // A trailing `/` says "everything under this" (`myregistry:5000/`).
    let under = allowed.ends_with('/');
    let allowed = allowed.trim_end_matches('/');
    let registry = !allowed.contains('/') && (under || looks_like_registry(allowed));
    if registry || (under && !allowed.contains('@')) {
        return image.strip_prefix(allowed).is_some_and(|r| r.starts_with('/') && r.len() > 1);
    }
    let last = allowed.rsplit('/').next().unwrap_or(allowed);
    if allowed.contains('@') || last.contains(':') {
        return image == allowed;
    }
    // A repository: itself, with a tag, a digest, or both.
    image == allowed
        || image
            .strip_prefix(allowed)
            .is_some_and(|r| (r.starts_with(':') || r.starts_with('@')) && !r.contains('/') && r.len() > 1)
}

/// An entry without `/` that names a registry (a host with a dot, with or without a port, or
/// `localhost`), not a Docker Hub image (`golang`, `golang:1.23`).
fn looks_like_registry(entry: &str) -> bool {
    let host = entry.split(':').next().unwrap_or(entry);
    host.contains('.') || host == "localhost"
}

/// Checks a policy's own values (the controller reports a bad one on the policy's status, and
/// `agentops run --policy` refuses the file).
pub fn validate(p: &AgentPolicy) -> Result<(), ManifestError> {
    let s = &p.spec;
    if let Some(sel) = &s.namespace_selector {
        Selector::try_from(sel.clone()).map_err(|e| ManifestError::new("spec.namespaceSelector", e.to_string()))?;
    }
    for (field, d) in [("spec.defaults.timeout", &s.defaults.timeout), ("spec.maximums.timeout", &s.maximums.timeout)] {
        if let Some(d) = d
            && (!super::is_plain_duration(d.trim()) || parse(d).is_none_or(|d| d.is_zero()))
        {
            return Err(ManifestError::new(field, format!("{d:?} is not a duration; write e.g. 30m, 4h")));
        }
    }
    for (field, b) in [
        ("spec.defaults.maxBudgetUsd", s.defaults.max_budget_usd),
        ("spec.maximums.maxBudgetUsd", s.maximums.max_budget_usd),
    ] {
        if let Some(b) = b
            && !(b.is_finite() && b > 0.0 && b <= limits::MAX_BUDGET_USD)
        {
            return Err(ManifestError::new(
                field,
                format!("is {b}; use a positive amount up to {}", limits::MAX_BUDGET_USD),
            ));
        }
    }
    for (i, h) in s.defaults.egress_hosts.iter().enumerate() {
        HostRule::parse(h).map_err(|e| ManifestError::new(format!("spec.defaults.egressHosts[{i}]"), e))?;
    }
    for (i, h) in s.allowed.egress_hosts.iter().flatten().enumerate() {
        HostRule::parse(h).map_err(|e| ManifestError::new(format!("spec.allowed.egressHosts[{i}]"), e))?;
    }
    for (i, b) in s.allowed.egress.iter().flatten().enumerate() {
        CidrRule::parse(&b.cidr, b.ports.clone())
            .map_err(|e| ManifestError::new(format!("spec.allowed.egress[{i}].cidr"), e))?;
    }
    if let Some(pod) = &s.defaults.pod {
        pod.check("spec.defaults.pod")?;
    }
    Ok(())
}

/// The policy a refusal names (`AgentPolicy "x"` in the message), for counting refusals.
pub fn refused_by(message: &str) -> Option<&str> {
    let rest = &message[message.find("AgentPolicy \"")? + "AgentPolicy \"".len()..];
    Some(&rest[..rest.find('"')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_match_by_registry_repository_or_reference() {
        assert!(image_allowed("registry.example.com", "registry.example.com/team/tool:1"));
        assert!(image_allowed("registry.example.com/", "registry.example.com/tool"));
        assert!(!image_allowed("registry.example.com", "registry.example.com.evil.io/tool"));
        assert!(!image_allowed("registry.example.com", "registry.example.comx/tool"));
        assert!(image_allowed("registry.example.com/team/tool", "registry.example.com/team/tool:2"));
        assert!(image_allowed("registry.example.com/team/tool", "registry.example.com/team/tool@sha256:ab"));
        assert!(!image_allowed("registry.example.com/team/tool", "registry.example.com/team/toolbox:1"));
        assert!(!image_allowed("golang", "golang:1.23/../x"));
        assert!(image_allowed("golang:1.23", "golang:1.23"));
        assert!(!image_allowed("golang:1.23", "golang:1.24"));
        assert!(!image_allowed("golang:1.23", "golang:1.23@sha256:ab"), "a digest replaces the tag");
        assert!(image_allowed("golang", "golang:1.24"));
        assert!(!image_allowed("golang", "golangx:1"));
        assert!(!image_allowed("registry.example.com", "registry.example.com:latest"), "a Docker Hub name");
        assert!(!image_allowed("registry.example.com", "registry.example.com@sha256:ab"));
        assert!(image_allowed("registry.example.com:5000", "registry.example.com:5000/team/go:1"));
        assert!(!image_allowed("registry.example.com:5000", "registry.example.com:50001/go:1"));
        assert!(!image_allowed("registry.example.com/team/tool:1.0", "registry.example.com/team/tool:1.0@sha256:aa"));
        assert!(image_allowed("localhost", "localhost/x:1"));
        assert!(image_allowed("myregistry:5000/", "myregistry:5000/x:1"));
        assert!(!image_allowed("myregistry:5000/", "myregistry:5000"));
    }

    #[test]
    fn model_lists_must_each_allow() {
        let tagged = vec!["a\u{1f}claude-sonnet-*".to_string(), "b\u{1f}claude-sonnet-4-6".to_string()];
        assert!(models_allow(&tagged, "claude-sonnet-4-6"));
        assert!(!models_allow(&tagged, "claude-sonnet-4-5"));
        assert!(!models_allow(&tagged, "claude-opus-4-1"));
        assert!(models_allow(&[], "anything"));
        assert_eq!(models_shown(&tagged), vec!["claude-sonnet-*", "claude-sonnet-4-6"]);
    }

    #[test]
    fn refusals_name_their_policy() {
        assert_eq!(
            refused_by("spec.timeout: is 5h, above 4h, which AgentPolicy \"company\" does not"),
            Some("company")
        );
        assert_eq!(refused_by("spec.timeout: bad"), None);
    }

    #[test]
    fn host_and_cidr_rules_cover_what_they_contain() {
        let h = |s: &str| HostRule::parse(s).expect("rule");
        assert!(h("*.example.com").covers(&h("a.example.com")));
        assert!(h("*.example.com").covers(&h("*.a.example.com")));
        assert!(h("*.example.com").covers(&h("*.example.com")));
        assert!(!h("*.example.com").covers(&h("example.com")));
        assert!(!h("*.example.com").covers(&h("a.example.com:80")));
        assert!(!h("a.example.com").covers(&h("*.example.com")));
        assert!(!h("*.example.com").covers(&h("*.badexample.com")));
        let c = |s: &str, p: &[u16]| CidrRule::parse(s, p.to_vec()).expect("cidr");
        assert!(c("10.0.0.0/8", &[]).covers(&c("10.1.0.0/16", &[443])));
        assert!(!c("10.0.0.0/8", &[]).covers(&c("0.0.0.0/0", &[443])));
        assert!(!c("10.0.0.0/8", &[]).covers(&c("::ffff:10.0.0.0/16", &[443])), "an IPv6 block, not an IPv4 one");
        assert!(!c("10.0.0.0/8", &[]).covers(&c("64:ff9b::a00:0/16", &[443])));
        assert!(!c("10.0.0.0/8", &[443]).covers(&c("10.1.0.0/16", &[])));
        assert!(!c("10.0.0.0/8", &[443]).covers(&c("10.1.0.0/16", &[443, 22])));
        assert!(c("10.0.0.0/8", &[443, 22]).covers(&c("10.1.0.0/16", &[22])));
    }
}
