//! What a reconcile reads before it decides: the execution's spec (template, values, the
//! Secrets it names) and, when it could start, the queue's answer.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use super::context::{Context, Error, key};
use super::decide::{Slot, Stall};
use super::executor::Executor;
use super::ledger;
use super::queue::{self, Candidate, Limits};
use super::status;
use crate::api::{AgentExecution, AgentTemplate, Phase, Reason, Resolved, resolve};

/// How long a Secret key seen to exist is not looked at again.
const SECRET_SEEN_FOR: Duration = Duration::from_secs(10);

/// An execution's spec, ready to run: resolved (with the cluster's defaults), as the runner
/// will read it, and its template.
pub struct Spec {
    pub resolved: Resolved,
    pub effective: AgentExecution,
    pub template: Option<AgentTemplate>,
}

/// Validates: template, spec values, secrets. Any failure is a Stall naming what to fix.
pub async fn read_spec(ax: &AgentExecution, ctx: &Context) -> Result<Result<Spec, Stall>, Error> {
    let ns = key(ax).0;
    let mut template = match &ax.spec.template_ref {
        None => None,
        Some(r) => match Api::<AgentTemplate>::namespaced(ctx.client.clone(), &ns).get_opt(&r.name).await? {
            Some(t) => Some(t),
            None => {
                let message = format!(
                    "AgentTemplate {:?} not found in namespace {ns} (spec.templateRef.name); the execution starts once it exists",
                    r.name
                );
                return Ok(Err(Stall { reason: Reason::TemplateNotFound, message, recheck: true }));
            }
        },
    };
    // The cluster's default timeout applies when neither the execution nor its template sets one;
    // the runner gets the same value in its manifest.
    let mut effective = ax.clone();
    if let Err(stall) = inline_config_maps(&ctx.client, &ns, &mut effective, template.as_mut()).await? {
        return Ok(Err(stall));
    }
    // The cluster's policies: their defaults under the template's, their maximums and
    // allowlists over the result. Decided once, when the execution starts: a started execution
    // keeps the limits its status records (a policy edited later changes no running agent).
    let (started, frozen) = started(ax, ctx).await?;
    let policies = if started {
        crate::api::policy::freeze(&mut effective, frozen.as_ref());
        Vec::new()
    } else {
        let (Ok(policies), true) = (ctx.policies.selecting(&ns), ctx.budgets.synced() && ctx.budgets.knows(&ns)) else {
            return Err(Error::Executor(
                "waiting for the watches of AgentPolicies, AgentBudgets and Namespaces to list (or to see this namespace)".into(),
            ));
        };
        crate::api::policy::apply_defaults(&mut effective, template.as_ref(), &policies.iter().collect::<Vec<_>>());
        // Under a policy the cluster's default model (the chart's `runner.defaultModel`) is named
        // in the spec, so that a model list can check it (and the gateway hold the agent to it).
        if !policies.is_empty()
            && effective.spec.agent.model.is_none()
            && template.as_ref().is_none_or(|t| t.spec.agent.model.is_none())
        {
            effective.spec.agent.model = ctx.config.job.default_model.clone();
        }
        policies
    };
    if effective.spec.timeout.is_none() && template.as_ref().is_none_or(|t| t.spec.timeout.is_none()) {
        effective.spec.timeout = ctx.config.default_timeout.clone();
    }
    let mut resolved = match resolve(&effective, template.as_slice()) {
        Ok(r) => r,
        Err(e) => return Ok(Err(Stall { reason: Reason::InvalidSpec, message: e.to_string(), recheck: false })),
    };
    if started {
        resolved.policy = frozen;
    } else if !policies.is_empty() {
        match check_policies(ax, ctx, &resolved, &policies) {
            Ok(record) => resolved.policy = Some(record),
            Err(stall) => return Ok(Err(stall)),
        }
    }
    // Host-name egress goes through the controller's egress proxy: without one (a controller
    // started with no `--egress-addr`), the agent would run without what it was promised.
    if !resolved.egress_hosts.is_empty() && matches!(ctx.executor, Executor::Job { .. }) && !ctx.reports.serves_egress()
    {
        let message = "spec.egressHosts: this controller serves no egress proxy; start it with --egress-addr \
                       (the chart does), or use spec.egress with the hosts' IP blocks";
        return Ok(Err(Stall { reason: Reason::InvalidSpec, message: message.into(), recheck: true }));
    }
    // With the cluster's default under them, every step's requests stay within its limits.
    if let Err(e) = ctx.config.job.pod.merged(&resolved.pod).check_requests_within_limits("spec.pod") {
        return Ok(Err(Stall { reason: Reason::InvalidSpec, message: e.to_string(), recheck: false }));
    }
    if let Some(message) = missing_secret(ctx, &ns, &resolved).await? {
        return Ok(Err(Stall { reason: Reason::SecretNotFound, message, recheck: true }));
    }
    if resolved.api_key.is_none() && matches!(ctx.executor, Executor::Job { .. }) {
        // A runner pod has no other way to get a key: fail before starting, not after.
        let message = "no Anthropic API key: set spec.agent.apiKeySecretRef (or in the AgentTemplate)".to_string();
        return Ok(Err(Stall { reason: Reason::ApiKeyMissing, message, recheck: true }));
    }
    Ok(Ok(Spec { resolved, effective, template }))
}

/// Whether the execution was started (by a controller of this store), and what the policies
/// decided then. With a store, only its record counts: a status someone else wrote (an
/// `agentConfigHash`, a `policy`) neither skips the policies nor sets the limits. Without a
/// store, the status is all there is.
pub async fn started(ax: &AgentExecution, ctx: &Context) -> Result<(bool, Option<crate::api::PolicyRecord>), Error> {
    match &ctx.store {
        Some(store) => Ok(match store.execution_policy(&super::ledger::uid(ax)).await? {
            Some(record) => (true, record),
            None => (false, None),
        }),
        None => {
            let st = ax.status.as_ref();
            Ok((st.is_some_and(|s| s.agent_config_hash.is_some()), st.and_then(|s| s.policy.clone())))
        }
    }
}

/// The policies' maximums and allowlists over a resolved execution. A refusal names the policy
/// and the field; it is looked at again (a policy relaxed later lets the execution start), and
/// counted on the policy's status once (when the execution's status did not say so yet).
fn check_policies(
    ax: &AgentExecution,
    ctx: &Context,
    r: &Resolved,
    policies: &[crate::api::AgentPolicy],
) -> Result<crate::api::PolicyRecord, Stall> {
    use crate::api::policy;
    let refs: Vec<&crate::api::AgentPolicy> = policies.iter().collect();
    let invalid = refs.iter().find_map(|p| {
        policy::validate(p).err().map(|e| {
            format!(
                "AgentPolicy {:?} cannot be applied ({e}); it refuses every execution it selects until the platform team fixes it",
                p.name_any()
            )
        })
    });
    let local = matches!(ctx.executor, Executor::Local(_));
    let message = match invalid {
        Some(m) => m,
        None => match policy::check(r, &refs, local) {
            Ok(record) => return Ok(record),
            Err(e) => e.to_string(),
        },
    };
    let told = ax.status.as_ref().and_then(|s| s.message.as_deref()) == Some(message.as_str());
    if !told && let Some(name) = policy::refused_by(&message) {
        ctx.policies.refused(name);
        ctx.metrics.policy_refusals.get_or_create(&super::metrics::PolicyLabel { policy: name.to_string() }).inc();
    }
    Err(Stall { reason: Reason::InvalidSpec, message, recheck: true })
}

/// Reads the ConfigMaps the agent's configuration names (skills: one key a file; subagents: one
/// key) and puts their contents inline, in the execution and its template as the runner's
/// manifest carries them: fixed when the execution starts, so a ConfigMap edited later changes
/// no started execution. A missing ConfigMap or key is a Stall naming the field, until the
/// execution started: then its runner has the files already, and the piece is left out here.
pub async fn inline_config_maps(
    client: &kube::Client,
    ns: &str,
    ax: &mut AgentExecution,
    template: Option<&mut AgentTemplate>,
) -> Result<Result<(), Stall>, Error> {
    let started = ax.status.as_ref().is_some_and(|s| s.agent_config_hash.is_some());
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut specs: Vec<(&str, &mut crate::api::AgentSpec)> = vec![("spec.agent", &mut ax.spec.agent)];
    if let Some(t) = template {
        specs.insert(0, ("the AgentTemplate's spec.agent", &mut t.spec.agent));
    }
    let missing = |field: String, what: String| Stall {
        reason: Reason::ConfigMapNotFound,
        message: format!("{what} in namespace {ns} ({field}); create it and the execution starts by itself"),
        recheck: true,
    };
    for (at, agent) in specs {
        let mut gone = Vec::new();
        for (i, skill) in agent.skills.iter_mut().enumerate() {
            let Some(r) = skill.config_map_ref.take() else { continue };
            let field = format!("{at}.skills[{i}].configMapRef");
            let Some(cm) = api.get_opt(&r.name).await? else {
                if started {
                    gone.push(skill.name.clone());
                    continue;
                }
                return Ok(Err(missing(field, format!("ConfigMap {:?} not found", r.name))));
            };
            // Text keys only: a skill's files are text (binaryData would not survive the manifest).
            for (key, value) in cm.data.unwrap_or_default() {
                skill.files.entry(key).or_insert(value);
            }
        }
        agent.skills.retain(|s| !gone.contains(&s.name));
        let mut gone = Vec::new();
        for (i, sub) in agent.subagents.iter_mut().enumerate() {
            let Some(r) = sub.config_map_key_ref.take() else { continue };
            let field = format!("{at}.subagents[{i}].configMapKeyRef");
            let text = api.get_opt(&r.name).await?.and_then(|cm| cm.data.unwrap_or_default().remove(&r.key));
            match text {
                Some(text) => sub.content = Some(text),
                None if started => gone.push(sub.name.clone()),
                None => {
                    let what = format!("ConfigMap {:?} with a key {:?} not found", r.name, r.key);
                    return Ok(Err(missing(field, what)));
                }
            }
        }
        agent.subagents.retain(|s| !gone.contains(&s.name));
    }
    Ok(Ok(()))
}

/// The queue's answer for this execution (under the admit lock).
pub fn queue_slot(ax: &AgentExecution, ctx: &Context) -> Slot {
    if ctx.config.limits == Limits::default() {
        // No limits: nothing to order, and no O(n) look at every execution per start.
        return Slot::Start;
    }
    let me = key(ax);
    let starting = ctx.ledger.starting();
    let mut all: Vec<Candidate> =
        ctx.cache.state().iter().filter(|o| key(o) != me).filter_map(|o| candidate(o, &starting, ctx)).collect();
    all.push(Candidate {
        namespace: me.0.clone(),
        name: me.1.clone(),
        priority: ax.spec.priority,
        created: created(ax),
        active: false,
    });
    let plan = queue::plan(&all, ctx.config.limits);
    if plan.start.contains(&me) {
        return Slot::Start;
    }
    let position = plan.queued.iter().find(|(k, _)| *k == me).map(|(_, p)| *p).unwrap_or(0);
    Slot::Wait(position, plan.queued.len())
}

async fn missing_secret(ctx: &Context, ns: &str, r: &Resolved) -> Result<Option<String>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let headers: Vec<(&crate::api::SecretKeyRef, String, &str)> = r
        .agent_config
        .mcp_servers
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.headers_from.iter().enumerate().map(move |(j, h)| {
                (&h.secret_key_ref, format!("spec.agent.mcpServers[{i}].headersFrom[{j}].secretKeyRef"), "value")
            })
        })
        .collect();
    let refs = r
        .credentials
        .iter()
        .map(|s| (s, "spec.repository.credentialsSecretRef".to_string(), "token"))
        .chain(r.api_key.iter().map(|s| (s, "spec.agent.apiKeySecretRef".to_string(), "api-key")))
        .chain(headers);
    for (s, field, default_key) in refs {
        let key = s.key.clone().unwrap_or_else(|| default_key.into());
        let seen = (ns.to_string(), s.name.clone(), key.clone());
        let fresh = ctx
            .secrets_seen
            .lock()
            .ok()
            .and_then(|m| m.get(&seen).copied())
            .is_some_and(|at| at.elapsed() < SECRET_SEEN_FOR);
        if fresh {
            continue;
        }
        match api.get_opt(&s.name).await? {
            None => {
                return Ok(Some(format!(
                    "Secret {:?} not found in namespace {ns} ({field}); create it and the execution starts by itself",
                    s.name
                )));
            }
            Some(secret) => {
                let has = secret.data.as_ref().is_some_and(|d| d.contains_key(&key))
                    || secret.string_data.as_ref().is_some_and(|d| d.contains_key(&key));
                drop(secret);
                if !has {
                    return Ok(Some(format!("Secret {:?} has no key {key:?} ({field})", s.name)));
                }
                if let Ok(mut m) = ctx.secrets_seen.lock() {
                    if m.len() > 10_000 {
                        m.clear();
                    }
                    m.insert(seen, std::time::Instant::now());
                }
            }
        }
    }
    Ok(None)
}

/// Decides whether this execution starts now or waits (Queued), and starts it.
fn created(ax: &AgentExecution) -> String {
    ax.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
}

/// An execution as the queue sees it; None for finished, cancelled or stalled ones.
fn candidate(ax: &AgentExecution, starting: &HashSet<String>, ctx: &Context) -> Option<Candidate> {
    let cached = ax.status.clone().unwrap_or_default();
    // The cache lags this process's own writes: an execution that just ended (and woke the
    // queue) still shows Running there, and would keep its slot until some later event.
    let st = ctx.ledger.peek_status(&ledger::uid(ax), &cached).unwrap_or(cached);
    if st.phase.is_terminal() || ax.spec.cancel || ax.metadata.deletion_timestamp.is_some() {
        return None;
    }
    // Started as a suspended Job: Kueue decides when it runs; it neither waits for nor holds a slot.
    if st.reason == Some(Reason::AwaitingAdmission) {
        return None;
    }
    let stalled = st.conditions.iter().any(|c| c.type_ == status::STALLED && c.status == "True");
    let active = st.phase == Phase::Running || starting.contains(&ledger::uid(ax));
    if stalled && !active {
        return None;
    }
    Some(Candidate {
        namespace: key(ax).0,
        name: ax.name_any(),
        priority: ax.spec.priority,
        created: created(ax),
        active,
    })
}
