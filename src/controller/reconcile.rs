//! Reconcile: finalizer → validate (template, spec, secrets) → cancel → observe the runner →
//! schedule and start, or follow it → status, events and the store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::events::Events;
use super::ledger::{self, Ledger};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::decide::{self, Decision, Effect, Facts, Next, Note, Slot, Stall, decide};
use super::desired::{self, JobConfig};
use super::executor::{Executor, Observation};
use super::metrics::{ErrorLabel, Metrics, PhaseLabel, TokenLabels, ToolLabel, UsageLabels};
use super::queue::{self, Candidate, Limits};
use super::reports::Reports;
use super::status;
use crate::api::Summary;
use crate::api::{AgentExecution, AgentExecutionStatus, AgentTemplate, Phase, Reason, Resolved, RetainPolicy, resolve};
use crate::store::{NewExecution, Store, StoreError};

/// How long a Secret key seen to exist is not looked at again.
const SECRET_SEEN_FOR: Duration = Duration::from_secs(10);

/// The finalizer earlier versions put on every execution. None is added now (see `reconcile`);
/// executions that still carry it have it taken off.
pub const FINALIZER: &str = "agentops.dev/cleanup";
/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "agentops-controller";

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
}

/// Entry point for the kube-runtime Controller.
///
/// No finalizer: everything an execution leaves goes with it by ownerReference (its Job, its
/// runner Secret, its egress policy, a workspace PVC it does not keep), so deleting one never
/// waits for the controller (nor hangs when the controller is gone). What only the controller
/// can do when one goes (record it in the store, stop a local runner, free its slot, close its
/// gateway account) happens in `deleted`, from the watch's delete event, and for those deleted
/// while nobody watched, from a sweep of the store after each full list.
pub async fn reconcile(ax: Arc<AgentExecution>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    if ax.finalizers().iter().any(|f| f == FINALIZER) {
        return retire_finalizer(&ax, &ctx).await;
    }
    if ax.metadata.deletion_timestamp.is_some() {
        // Held by someone else's finalizer: nothing starts; `deleted` runs once it is gone.
        return Ok(Action::await_change());
    }
    apply(ax, &ctx).await
}

/// An execution from an earlier version carries our finalizer: do what it stood for (when the
/// execution is being deleted, `deleted`; either way, a workspace its policy keeps is no
/// longer owned by it), then take it off with a JSON patch guarded by a `test`.
async fn retire_finalizer(ax: &AgentExecution, ctx: &Context) -> Result<Action, Error> {
    let (ns, name) = key(ax);
    if ax.metadata.deletion_timestamp.is_some() {
        deleted(ax, ctx).await?;
    }
    if keeps_workspace(ax, ax.status.as_ref().map(|s| s.phase).unwrap_or_default())
        && let Some(pvc) = desired::desired_pvc(ax, &ctx.config.job)
    {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"metadata": {"ownerReferences": null}});
        match api.patch(&pvc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let at = ax.finalizers().iter().position(|f| f == FINALIZER).unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]))
    .map_err(|e| Error::Executor(format!("finalizer patch: {e}")))?;
    let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &ns);
    match api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// Whether the workspace outlives the execution, by its retention policy and how it ended.
fn keeps_workspace(ax: &AgentExecution, phase: Phase) -> bool {
    match ax.spec.workspace.retain.unwrap_or_default() {
        RetainPolicy::Delete => false,
        RetainPolicy::Retain => true,
        RetainPolicy::RetainOnFailure => phase != Phase::Succeeded,
    }
}

/// Logs, and retries later with a short backoff.
pub fn error_policy(ax: Arc<AgentExecution>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&ErrorLabel { kind: err.metric_label().into() }).inc();
    tracing::warn!(execution = %ax.name_any(), error = %err, kind = err.metric_label(), "reconcile failed");
    Action::requeue(ctx.config.retry_after)
}

fn key(ax: &AgentExecution) -> (String, String) {
    (ax.namespace().unwrap_or_else(|| "default".into()), ax.name_any())
}

/// Renders the manifest the runner reads: the execution and its template, without status or
/// server metadata.
pub fn runner_manifest(ax: &AgentExecution, template: Option<&AgentTemplate>) -> Result<String, Error> {
    let mut out = String::new();
    if let Some(t) = template {
        let doc = json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentTemplate",
                         "metadata": {"name": t.name_any(), "namespace": t.namespace()}, "spec": t.spec});
        out.push_str(&serde_norway::to_string(&doc).map_err(|e| Error::Manifest(e.to_string()))?);
        out.push_str("---\n");
    }
    let doc = json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentExecution",
                     "metadata": {"name": ax.name_any(), "namespace": ax.namespace()}, "spec": ax.spec});
    out.push_str(&serde_norway::to_string(&doc).map_err(|e| Error::Manifest(e.to_string()))?);
    Ok(out)
}

/// One reconcile of a live execution: read what is true now, `decide`, act on the decision.
async fn apply(ax: Arc<AgentExecution>, ctx: &Context) -> Result<Action, Error> {
    let old = last_status(&ax, ctx);
    // Read: the spec (template, values, secrets), the runner with its reports.
    let read = if old.phase.is_terminal() { None } else { Some(read_spec(&ax, ctx).await?) };
    let ready = read.as_ref().and_then(|r| r.as_ref().ok());
    let observed = match ready {
        Some(_) => ctx.executor.observe(&ctx.client, &ax, &ctx.reports).await?,
        None => Observation::NotStarted,
    };
    // A queue slot is asked for (and held, so that two reconciles never take the same one)
    // only when this execution could start now.
    let wants_slot = ready.is_some()
        && !ax.spec.cancel
        && matches!(observed, Observation::NotStarted)
        && old.phase != Phase::Running;
    let _admit = if wants_slot { Some(ctx.admit.lock().await) } else { None };
    let slot = if wants_slot { Some(queue_slot(&ax, ctx)) } else { None };
    let placeholder = Stall { reason: Reason::Completed, message: String::new(), recheck: false };
    let decision = decide(Facts {
        old: &old,
        generation: ax.metadata.generation,
        spec: match &read {
            Some(Ok(spec)) => Ok(&spec.resolved),
            Some(Err(stall)) => Err(stall.clone()),
            None => Err(placeholder),
        },
        cancel: ax.spec.cancel,
        ttl_seconds: ax.spec.ttl_seconds_after_finished,
        observed,
        slot,
        kueue_queue: matches!(ctx.executor, Executor::Job { .. })
            .then(|| ax.labels().get(desired::KUEUE_QUEUE_LABEL).cloned())
            .flatten(),
        runner: ctx.executor.runner_name(&ax),
        workspace: desired::desired_pvc(&ax, &ctx.config.job)
            .and_then(|p| p.metadata.name)
            .unwrap_or_else(|| "emptyDir".into()),
        now: jiff::Timestamp::now(),
    });
    act(&ax, ctx, &old, ready, decision).await
}

/// The status to decide from: the cache's, unless this process finished the execution and
/// the watch cache has not caught up with that final write yet (what we finished is final).
fn last_status(ax: &AgentExecution, ctx: &Context) -> AgentExecutionStatus {
    ctx.ledger.last_status(&ledger::uid(ax), ax.status.clone().unwrap_or_default())
}

/// An execution's spec, ready to run: resolved (with the cluster's defaults), as the runner
/// will read it, and its template.
struct Spec {
    resolved: Resolved,
    effective: AgentExecution,
    template: Option<AgentTemplate>,
}

/// Validates: template, spec values, secrets. Any failure is a Stall naming what to fix.
async fn read_spec(ax: &AgentExecution, ctx: &Context) -> Result<Result<Spec, Stall>, Error> {
    let ns = key(ax).0;
    let template = match &ax.spec.template_ref {
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
    if effective.spec.timeout.is_none() && template.as_ref().is_none_or(|t| t.spec.timeout.is_none()) {
        effective.spec.timeout = ctx.config.default_timeout.clone();
    }
    let resolved = match resolve(&effective, template.as_slice()) {
        Ok(r) => r,
        Err(e) => return Ok(Err(Stall { reason: Reason::InvalidSpec, message: e.to_string(), recheck: false })),
    };
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

/// The queue's answer for this execution (under the admit lock).
fn queue_slot(ax: &AgentExecution, ctx: &Context) -> Slot {
    if ctx.config.limits == Limits::default() {
        // No limits: nothing to order, and no O(n) look at every execution per start.
        return Slot::Start;
    }
    let me = key(ax);
    let starting = ctx.ledger.starting();
    let mut all: Vec<Candidate> =
        ctx.cache.state().iter().filter(|o| key(o) != me).filter_map(|o| candidate(o, &starting)).collect();
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

/// Applies a decision, in one fixed order: remember, stop, start, record, status and event,
/// workspace, memory, queue, TTL.
async fn act(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    spec: Option<&Spec>,
    d: Decision,
) -> Result<Action, Error> {
    let (ns, name) = key(ax);
    let uid = ledger::uid(ax);
    let has = |e: Effect| d.effects.contains(&e);
    let mut status = d.status;
    if has(Effect::Remember)
        && let (Some(store), Some(spec)) = (&ctx.store, spec)
    {
        store.ensure_execution(&new_execution(ax, &spec.resolved)).await?;
    }
    if has(Effect::Stop)
        && let Some(last) = ctx.executor.stop(&ctx.client, ax).await?
    {
        // The runner's own last report is the freshest usage.
        decide::with_report(&mut status, &last);
    }
    if has(Effect::Start)
        && let Some(spec) = spec
    {
        let manifest = runner_manifest(&spec.effective, spec.template.as_ref())?;
        ctx.executor
            .start(&ctx.client, &spec.effective, &spec.resolved, &manifest, &ctx.config.job, &ctx.reports)
            .await?;
        if let Some(created) = ax.metadata.creation_timestamp.as_ref().map(|t| t.0) {
            let waited = jiff::Timestamp::now().duration_since(created).as_secs_f64().max(0.0);
            ctx.metrics.queue_wait_seconds.observe(waited);
        }
        if status.phase == Phase::Running {
            ctx.ledger.update(&uid, |e| e.started = Some(std::time::Instant::now()));
        }
    }
    if has(Effect::Unreserve) {
        ctx.ledger.with(&uid, |e| e.started = None);
    }
    // The store first: once the status says it is over, the record is there (and a retried
    // status write only repeats an idempotent update).
    if has(Effect::Record) {
        if let Some(store) = &ctx.store {
            let summary = record_of(ax, &status, ctx.reports.latest(&uid).map(|s| s.api_retries));
            let error = (status.phase != Phase::Succeeded).then(|| status.reason.as_deref().unwrap_or_default());
            store.finish_execution(&summary, error, None).await?;
        }
        if let Some(spec) = spec {
            record_metrics(ctx, &spec.resolved, status.phase, &status);
        }
    }
    write_status(ax, ctx, old, &status, d.event.as_ref()).await?;
    if status != *old {
        ctx.ledger.update(&uid, |e| e.written = Some(Box::new(status.clone())));
    }
    if has(Effect::ReleaseWorkspace)
        && !keeps_workspace(ax, status.phase)
        && let Some(pvc) = desired::desired_pvc(ax, &ctx.config.job)
    {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        match api.delete(&pvc.name_any(), &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if has(Effect::Forget) {
        ctx.reports.forget(&uid, &ns, &name);
    }
    if has(Effect::WakeQueue) {
        wake_queue(ctx, &(ns.clone(), name.clone()));
    }
    if has(Effect::DeleteSelf) {
        let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &ns);
        api.delete(&name, &DeleteParams::default()).await?;
        return Ok(Action::await_change());
    }
    Ok(match d.next {
        Next::AwaitChange => Action::await_change(),
        Next::Recheck => Action::requeue(ctx.config.recheck_stalled),
        Next::After(t) => Action::requeue(t),
    })
}

/// The store's final record of an execution, from its final status.
fn record_of(ax: &AgentExecution, st: &AgentExecutionStatus, api_retries: Option<u64>) -> Summary {
    let (namespace, name) = key(ax);
    Summary {
        id: ax.metadata.uid.clone().unwrap_or_default(),
        name,
        namespace,
        phase: st.phase,
        reason: st.reason.clone(),
        message: st.message.clone(),
        start_time: st.start_time.clone(),
        completion_time: st.completion_time.clone(),
        duration_ms: st.duration_ms.unwrap_or_default(),
        tokens_used: st.tokens_used,
        usage: st.usage,
        cost_usd: st.cost_usd,
        num_turns: st.num_turns,
        tool_calls: st.tool_calls.clone(),
        session_id: st.session_id.clone(),
        result: st.result.clone(),
        api_retries: api_retries.unwrap_or_default(),
        git: st.git.clone(),
        workspace: st.workspace.clone(),
    }
}

async fn missing_secret(ctx: &Context, ns: &str, r: &Resolved) -> Result<Option<String>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let refs = r
        .credentials
        .iter()
        .map(|s| (s, "spec.repository.credentialsSecretRef", "token"))
        .chain(r.api_key.iter().map(|s| (s, "spec.agent.apiKeySecretRef", "api-key")));
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

fn new_execution<'a>(ax: &'a AgentExecution, r: &'a Resolved) -> NewExecution<'a> {
    NewExecution::new(ax.metadata.uid.as_deref().unwrap_or_default(), r)
}

/// Decides whether this execution starts now or waits (Queued), and starts it.
fn created(ax: &AgentExecution) -> String {
    ax.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
}

/// An execution as the queue sees it; None for finished, cancelled or stalled ones.
fn candidate(ax: &AgentExecution, starting: &HashSet<String>) -> Option<Candidate> {
    let st = ax.status.clone().unwrap_or_default();
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

/// An execution is gone (or, from an earlier version, going): stop its local runner (a Job
/// goes with its owner), record the end in the store when it had not ended, free its slot,
/// and drop what is kept for it.
pub async fn deleted(ax: &AgentExecution, ctx: &Context) -> Result<(), Error> {
    let uid = ledger::uid(ax);
    let (ns, name) = key(ax);
    let st = ctx.ledger.last_status(&uid, ax.status.clone().unwrap_or_default());
    if !st.phase.is_terminal() {
        if matches!(ctx.executor, Executor::Local(_)) || ax.metadata.deletion_timestamp.is_some() {
            ctx.executor.stop(&ctx.client, ax).await?;
        }
        if let Some(store) = &ctx.store
            && let Some(id) = &ax.metadata.uid
        {
            let s = Summary {
                id: id.clone(),
                name: name.clone(),
                namespace: ns.clone(),
                phase: Phase::Cancelled,
                reason: Some(Reason::Deleted),
                message: Some("the AgentExecution was deleted before it finished".into()),
                usage: st.usage,
                tokens_used: st.tokens_used,
                cost_usd: st.cost_usd,
                num_turns: st.num_turns,
                tool_calls: st.tool_calls.clone(),
                start_time: st.start_time.clone(),
                completion_time: Some(jiff::Timestamp::now().to_string()),
                git: st.git.clone(),
                ..Default::default()
            };
            store.finish_execution(&s, Some("Deleted"), None).await?;
        }
        if st.phase == Phase::Running {
            wake_queue(ctx, &(ns.clone(), name.clone()));
        }
    }
    ctx.reports.forget(&uid, &ns, &name);
    ctx.ledger.remove(&uid);
    Ok(())
}

/// Ends, in the store, the executions that are gone from the (just listed) cache without this
/// controller having seen them go.
pub async fn sweep(ctx: &Context) -> Result<usize, Error> {
    let Some(store) = &ctx.store else { return Ok(0) };
    let present: HashSet<String> = ctx.cache.state().iter().filter_map(|o| o.metadata.uid.clone()).collect();
    let served = |ns: &str| ctx.config.namespaces.as_ref().is_none_or(|set| set.contains(ns));
    let mut n = 0;
    for (id, ns, name) in store.unfinished().await? {
        if served(&ns) && !present.contains(&id) {
            store.mark_deleted(&id).await?;
            ctx.reports.forget(&id, &ns, &name);
            n += 1;
        }
    }
    Ok(n)
}

/// A slot is free: wake the executions waiting for one.
fn wake_queue(ctx: &Context, except: &(String, String)) {
    for o in ctx.cache.state() {
        let p = o.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if matches!(p, Phase::Queued | Phase::Pending) && key(&o) != *except {
            let _ = ctx.wake.send(ObjectRef::from_obj(&*o));
        }
    }
}

/// Writes the status with server-side apply, only when it changed, and publishes the event.
async fn write_status(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    st: &AgentExecutionStatus,
    event: Option<&Note>,
) -> Result<(), Error> {
    if st == old {
        return Ok(());
    }
    let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &key(ax).0);
    let patch = json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentExecution", "status": st});
    api.patch_status(&ax.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    if let Some(note) = event
        && let Err(e) = ctx.events.publish(note, "Reconcile", &ax.object_ref(&())).await
    {
        tracing::warn!(error = %e, "cannot publish event");
    }
    Ok(())
}

pub async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether an API error is 404 Not Found.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn record_metrics(ctx: &Context, r: &Resolved, phase: Phase, st: &AgentExecutionStatus) {
    let m = &ctx.metrics;
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
    m.cost_usd.get_or_create(&UsageLabels { namespace: ns, model }).inc_by(st.cost_usd);
    for (tool, n) in &st.tool_calls.by_tool {
        m.tool_calls.get_or_create(&ToolLabel { tool: tool.clone() }).inc_by(*n);
    }
}
