//! Reconcile: finalizer → validate (template, spec, secrets) → cancel → observe the runner →
//! schedule and start, or follow it → status, events and the store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::desired::{self, JobConfig};
use super::executor::{Executor, Observation};
use super::metrics::{ErrorLabel, Metrics, PhaseLabel, TokenLabels, ToolLabel, UsageLabels};
use super::queue::{self, Candidate, Limits};
use super::reports::Reports;
use super::status::{self, Blocked};
use crate::api::Summary;
use crate::api::{AgentExecution, AgentExecutionStatus, AgentTemplate, Phase, Resolved, RetainPolicy, resolve};
use crate::store::{NewExecution, Store, StoreError};

/// Finalizer that lets the controller record the final state and release the workspace.
pub const FINALIZER: &str = "agentops.dev/cleanup";
/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "agentops-controller";

/// A reconcile failure, with a label for the error metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
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
            Error::Finalizer(_) => "finalizer",
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
    pub recorder: Recorder,
    pub executor: Executor,
    /// Executions started by this process whose Running status may not be in the cache yet.
    pub starting: Mutex<HashSet<(String, String)>>,
    /// Final statuses written but perhaps not yet seen by the watch cache, by uid: a reconcile
    /// that reads a stale cache must not finish the same execution twice.
    pub finished: Mutex<std::collections::HashMap<String, AgentExecutionStatus>>,
    /// Serialises "decide and start" so that two reconciles never take the same slot.
    pub admit: tokio::sync::Mutex<()>,
    /// Wakes one execution (a slot freed, a runner reported).
    pub wake: mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
    pub metrics: Arc<Metrics>,
    /// Live progress and final reports from runners.
    pub reports: Arc<Reports>,
}

/// Entry point for the kube-runtime Controller.
pub async fn reconcile(ax: Arc<AgentExecution>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ax.namespace().unwrap_or_else(|| "default".into());
    let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, ax, |event| async {
        match event {
            Finalizer::Apply(ax) => apply(ax, &ctx).await,
            Finalizer::Cleanup(ax) => cleanup(ax, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
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

fn now() -> Time {
    Time(jiff::Timestamp::now())
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

async fn apply(ax: Arc<AgentExecution>, ctx: &Context) -> Result<Action, Error> {
    let (ns, _) = key(&ax);
    let uid = ax.metadata.uid.clone().unwrap_or_default();
    let cached = ax.status.clone().unwrap_or_default();
    // The watch cache can lag our own final status write; what we finished is final.
    let old = {
        let mut done = ctx.finished.lock().unwrap_or_else(|e| e.into_inner());
        if cached.phase.is_terminal() {
            done.remove(&uid);
            cached
        } else {
            done.get(&uid).cloned().unwrap_or(cached)
        }
    };
    if old.phase.is_terminal() {
        return expire(&ax, &old, ctx).await;
    }

    // Validate: template, spec values, secrets. Any failure is Stalled, naming what to fix.
    let template = match &ax.spec.template_ref {
        None => None,
        Some(r) => match Api::<AgentTemplate>::namespaced(ctx.client.clone(), &ns).get_opt(&r.name).await? {
            Some(t) => Some(t),
            None => {
                let msg = format!(
                    "AgentTemplate {:?} not found in namespace {ns} (spec.templateRef.name); the execution starts once it exists",
                    r.name
                );
                return blocked(&ax, ctx, &old, "TemplateNotFound", msg, true).await;
            }
        },
    };
    // The cluster's default timeout applies when neither the execution nor its template sets one;
    // the runner gets the same value in its manifest.
    let mut effective = (*ax).clone();
    if effective.spec.timeout.is_none() && template.as_ref().is_none_or(|t| t.spec.timeout.is_none()) {
        effective.spec.timeout = ctx.config.default_timeout.clone();
    }
    let r = match resolve(&effective, template.as_slice()) {
        Ok(r) => r,
        Err(e) => return blocked(&ax, ctx, &old, "InvalidSpec", e.to_string(), false).await,
    };
    if let Some(msg) = missing_secret(ctx, &ns, &r).await? {
        return blocked(&ax, ctx, &old, "SecretNotFound", msg, true).await;
    }
    if r.api_key.is_none() && matches!(ctx.executor, Executor::Job) {
        // A runner pod has no other way to get a key: fail before starting, not after.
        let msg = "no Anthropic API key: set spec.agent.apiKeySecretRef (or in the AgentTemplate)".to_string();
        return blocked(&ax, ctx, &old, "ApiKeyMissing", msg, true).await;
    }
    if let Some(store) = &ctx.store {
        store.ensure_execution(&new_execution(&ax, &r)).await?;
    }

    let observed = ctx.executor.observe(&ctx.client, &ax).await?;
    if ax.spec.cancel {
        let stopped = match observed {
            Observation::NotStarted => None,
            _ => ctx.executor.stop(&ctx.client, &ax).await?,
        };
        let summary = match observed {
            Observation::Finished { summary: Some(s), .. } => Some(s),
            _ => stopped.or_else(|| ctx.reports.latest(&ns, &ax.name_any())),
        };
        return finish(
            &ax,
            ctx,
            &old,
            &r,
            Phase::Cancelled,
            "Cancelled",
            "cancelled by spec.cancel; the usage spent so far is kept".into(),
            summary,
        )
        .await;
    }

    match observed {
        Observation::NotStarted if old.phase == Phase::Running => {
            // Started before, and the runner is gone without a result: never start twice.
            finish(
                &ax,
                ctx,
                &old,
                &r,
                Phase::Failed,
                "RunnerLost",
                "the runner disappeared before reporting a result".into(),
                None,
            )
            .await
        }
        Observation::NotStarted => schedule(&effective, ctx, &old, &r, template.as_ref()).await,
        Observation::Running { progress } => {
            let progress = progress.or_else(|| ctx.reports.latest(&ns, &ax.name_any()));
            let mut st = old.clone();
            st.phase = Phase::Running;
            st.reason = Some("Running".into());
            st.message = Some(format!("the agent is working on {}", r.repo_url));
            st.job_name = Some(ctx.executor.runner_name(&ax));
            if st.start_time.is_none() {
                st.start_time = Some(jiff::Timestamp::now().to_string());
            }
            if let Some(p) = progress {
                apply_summary(&mut st, &p);
                st.phase = Phase::Running;
                st.reason = Some("Running".into());
            }
            write_status(&ax, ctx, &old, st, None).await?;
            // Job changes wake us; the deadline is the Job's own. Look again now and then.
            Ok(Action::requeue(Duration::from_secs(60)))
        }
        Observation::Suspended => {
            // Kueue has not admitted the Job yet: waiting, and holding no slot of ours.
            if let Ok(mut st) = ctx.starting.lock() {
                st.remove(&key(&ax));
            }
            let mut st = old.clone();
            st.phase = Phase::Queued;
            st.reason = Some("AwaitingAdmission".into());
            st.message = Some(suspended_message(&ax));
            st.job_name = Some(ctx.executor.runner_name(&ax));
            let event = (old.reason.as_deref() != Some("AwaitingAdmission"))
                .then(|| ("AwaitingAdmission", suspended_message(&ax), EventType::Normal));
            write_status(&ax, ctx, &old, st, event).await?;
            Ok(Action::requeue(Duration::from_secs(60)))
        }
        Observation::Finished { summary, failed, deadline_exceeded, cause } => {
            // The termination message, else the runner's last report if it was the final one.
            let summary = summary.or_else(|| ctx.reports.latest(&ns, &ax.name_any()).filter(|s| s.phase.is_terminal()));
            let (phase, reason, message) = match (&summary, failed, deadline_exceeded) {
                (_, _, true) => {
                    (Phase::TimedOut, "Timeout".to_string(), "the Job exceeded its deadline (spec.timeout)".to_string())
                }
                (Some(s), _, _) => {
                    (s.phase, s.reason.clone().unwrap_or_default(), s.message.clone().unwrap_or_default())
                }
                (None, false, _) => {
                    (Phase::Succeeded, "Completed".into(), "the runner finished without a report".into())
                }
                (None, true, _) => (
                    Phase::Failed,
                    "RunnerFailed".into(),
                    match cause {
                        Some(c) => format!("the runner failed without a report: {c}"),
                        None => "the runner failed without a report; see the runner's logs".into(),
                    },
                ),
            };
            finish(&ax, ctx, &old, &r, phase, &reason, message, summary).await
        }
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
                if !has {
                    return Ok(Some(format!("Secret {:?} has no key {key:?} ({field})", s.name)));
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
async fn schedule(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    r: &Resolved,
    template: Option<&AgentTemplate>,
) -> Result<Action, Error> {
    let me = key(ax);
    let _admit = ctx.admit.lock().await;
    let unlimited = ctx.config.limits == Limits::default();
    let plan = if unlimited {
        // No limits: nothing to order, and no O(n) look at every execution per start.
        queue::Plan { start: vec![me.clone()], queued: Vec::new() }
    } else {
        let starting = ctx.starting.lock().map(|s| s.clone()).unwrap_or_default();
        let mut all: Vec<Candidate> =
            ctx.cache.state().iter().filter(|o| key(o) != me).filter_map(|o| candidate(o, &starting)).collect();
        all.push(Candidate {
            namespace: me.0.clone(),
            name: me.1.clone(),
            priority: ax.spec.priority,
            created: created(ax),
            active: false,
        });
        queue::plan(&all, ctx.config.limits)
    };
    if !plan.start.contains(&me) {
        let (pos, total) =
            plan.queued.iter().find(|(k, _)| *k == me).map(|(_, p)| (*p, plan.queued.len())).unwrap_or((0, 0));
        let mut st = old.clone();
        st.phase = Phase::Queued;
        st.reason = Some("Queued".into());
        st.message = Some(format!("waiting for a free slot: position {pos} of {total}"));
        let event = (old.phase != Phase::Queued)
            .then(|| ("Queued", format!("waiting for a free slot (position {pos})"), EventType::Normal));
        write_status(ax, ctx, old, st, event).await?;
        return Ok(Action::await_change());
    }
    let manifest = runner_manifest(ax, template)?;
    ctx.executor.start(&ctx.client, ax, r, &manifest, &ctx.config.job, &ctx.reports).await?;
    if let Some(created) = ax.metadata.creation_timestamp.as_ref().map(|t| t.0) {
        let waited = jiff::Timestamp::now().duration_since(created).as_secs_f64().max(0.0);
        ctx.metrics.queue_wait_seconds.observe(waited);
    }
    if matches!(ctx.executor, Executor::Job) && ax.labels().contains_key(desired::KUEUE_QUEUE_LABEL) {
        // Created suspended: Kueue admits it (then the Job runs and the status says Running).
        let mut st = old.clone();
        st.phase = Phase::Queued;
        st.reason = Some("AwaitingAdmission".into());
        st.message = Some(suspended_message(ax));
        st.job_name = Some(ctx.executor.runner_name(ax));
        st.git.branch = Some(r.branch.clone());
        let event = Some(("AwaitingAdmission", suspended_message(ax), EventType::Normal));
        write_status(ax, ctx, old, st, event).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    if let Ok(mut s) = ctx.starting.lock() {
        s.insert(me);
    }
    let mut st = old.clone();
    st.phase = Phase::Running;
    st.reason = Some("Started".into());
    st.message = Some(format!("runner {} started", ctx.executor.runner_name(ax)));
    st.job_name = Some(ctx.executor.runner_name(ax));
    st.start_time = Some(jiff::Timestamp::now().to_string());
    st.git.branch = Some(r.branch.clone());
    st.workspace = desired::desired_pvc(ax, &ctx.config.job).and_then(|p| p.metadata.name).or(Some("emptyDir".into()));
    write_status(
        ax,
        ctx,
        old,
        st,
        Some(("Started", format!("runner {} started", ctx.executor.runner_name(ax)), EventType::Normal)),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn created(ax: &AgentExecution) -> String {
    ax.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
}

/// An execution as the queue sees it; None for finished, cancelled or stalled ones.
fn candidate(ax: &AgentExecution, starting: &HashSet<(String, String)>) -> Option<Candidate> {
    let st = ax.status.clone().unwrap_or_default();
    if st.phase.is_terminal() || ax.spec.cancel || ax.metadata.deletion_timestamp.is_some() {
        return None;
    }
    // Started as a suspended Job: Kueue decides when it runs; it neither waits for nor holds a slot.
    if st.reason.as_deref() == Some("AwaitingAdmission") {
        return None;
    }
    let stalled = st.conditions.iter().any(|c| c.type_ == status::STALLED && c.status == "True");
    let active = st.phase == Phase::Running || starting.contains(&key(ax));
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

fn suspended_message(ax: &AgentExecution) -> String {
    let queue = ax.labels().get(desired::KUEUE_QUEUE_LABEL).cloned().unwrap_or_else(|| "?".into());
    format!("the Job waits for Kueue to admit it (queue {queue})")
}

/// Stalled on a bad reference or value: say so, and look again later when it may appear.
async fn blocked(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    reason: &str,
    message: String,
    recheck: bool,
) -> Result<Action, Error> {
    let mut st = old.clone();
    st.phase = Phase::Pending;
    st.reason = Some(reason.into());
    st.message = Some(message.clone());
    let b = Blocked { reason: reason.into(), message: message.clone() };
    let was = old.reason.as_deref() == Some(reason) && old.message.as_deref() == Some(message.as_str());
    let event = (!was).then_some((reason, message, EventType::Warning));
    write_status_with(ax, ctx, old, st, event, Some(&b)).await?;
    Ok(if recheck { Action::requeue(ctx.config.recheck_stalled) } else { Action::await_change() })
}

/// Copies a runner summary's figures into a status.
fn apply_summary(st: &mut AgentExecutionStatus, s: &Summary) {
    st.usage = s.usage;
    st.tokens_used = s.tokens_used;
    st.cost_usd = s.cost_usd;
    st.num_turns = s.num_turns;
    st.tool_calls = s.tool_calls.clone();
    st.session_id = s.session_id.clone().or(st.session_id.take());
    if s.result.is_some() {
        st.result = s.result.clone();
    }
    if s.git.branch.is_some() {
        st.git = s.git.clone();
    }
}

/// The end: final status, event, store, workspace release, and a wake-up for the queue.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    r: &Resolved,
    phase: Phase,
    reason: &str,
    message: String,
    summary: Option<Summary>,
) -> Result<Action, Error> {
    let mut st = old.clone();
    if let Some(s) = &summary {
        apply_summary(&mut st, s);
    }
    st.phase = phase;
    st.reason = Some(reason.into());
    st.message = Some(message.clone());
    let end = jiff::Timestamp::now();
    st.completion_time = Some(end.to_string());
    let start = st.start_time.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let ms = summary
        .as_ref()
        .map(|s| s.duration_ms)
        .filter(|d| *d > 0)
        .or_else(|| start.map(|s| end.duration_since(s).as_millis().max(0) as u64));
    st.duration_ms = ms;
    st.duration = ms.map(|ms| humantime::format_duration(Duration::from_millis(ms / 1000 * 1000)).to_string());
    // The store first: once the status says it is over, the record is there (and a retried
    // status write only repeats an idempotent update).
    if let Some(store) = &ctx.store {
        let s = Summary {
            id: ax.metadata.uid.clone().unwrap_or_default(),
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            phase,
            reason: Some(reason.into()),
            message: Some(message.clone()),
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
            api_retries: summary.as_ref().map(|s| s.api_retries).unwrap_or_default(),
            git: st.git.clone(),
            workspace: st.workspace.clone(),
        };
        store.finish_execution(&s, (phase != Phase::Succeeded).then_some(reason), None).await?;
    }
    let event_type = if phase == Phase::Succeeded { EventType::Normal } else { EventType::Warning };
    write_status(ax, ctx, old, st.clone(), Some((phase.as_str(), format!("{reason}: {message}"), event_type))).await?;
    if let Some(uid) = &ax.metadata.uid {
        ctx.finished.lock().unwrap_or_else(|e| e.into_inner()).insert(uid.clone(), st.clone());
    }

    record_metrics(ctx, r, phase, &st);

    // Release the workspace volume now unless the policy keeps it.
    let keep = match r.retain {
        RetainPolicy::Delete => false,
        RetainPolicy::Retain => true,
        RetainPolicy::RetainOnFailure => phase != Phase::Succeeded,
    };
    if !keep && let Some(pvc) = desired::desired_pvc(ax, &ctx.config.job) {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &key(ax).0);
        match api.delete(&pvc.name_any(), &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let me = key(ax);
    if let Ok(mut s) = ctx.starting.lock() {
        s.remove(&me);
    }
    ctx.reports.forget(&me.0, &me.1);
    ctx.executor.forget(ax);
    // A slot is free: wake the executions that wait for one.
    for o in ctx.cache.state() {
        let p = o.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if matches!(p, Phase::Queued | Phase::Pending) && key(&o) != me {
            let _ = ctx.wake.send(ObjectRef::from_obj(&*o));
        }
    }
    expire(ax, &st, ctx).await
}

/// `ttlSecondsAfterFinished`: delete the finished execution when its time is up.
async fn expire(ax: &AgentExecution, st: &AgentExecutionStatus, ctx: &Context) -> Result<Action, Error> {
    let Some(ttl) = ax.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let done = st
        .completion_time
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .unwrap_or_else(jiff::Timestamp::now);
    let age = jiff::Timestamp::now().duration_since(done).as_secs();
    if age >= ttl {
        let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &key(ax).0);
        api.delete(&ax.name_any(), &DeleteParams::default()).await?;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs((ttl - age).max(1) as u64)))
}

/// Finalizer cleanup: stop a runner still going, keep a retained workspace, record the end.
async fn cleanup(ax: Arc<AgentExecution>, ctx: &Context) -> Result<Action, Error> {
    let st = ax.status.clone().unwrap_or_default();
    if !st.phase.is_terminal() {
        ctx.executor.stop(&ctx.client, &ax).await?;
        if let Ok(mut s) = ctx.starting.lock() {
            s.remove(&key(&ax));
        }
    }
    ctx.executor.forget(&ax);
    let retain = ax.spec.workspace.retain.unwrap_or_default();
    let keep = match retain {
        RetainPolicy::Delete => false,
        RetainPolicy::Retain => true,
        RetainPolicy::RetainOnFailure => st.phase != Phase::Succeeded,
    };
    if keep && let Some(pvc) = desired::desired_pvc(&ax, &ctx.config.job) {
        // Orphan the PVC so that garbage collection leaves it when the execution goes.
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &key(&ax).0);
        let patch = json!({"metadata": {"ownerReferences": null}});
        match api.patch(&pvc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(store) = &ctx.store
        && !st.phase.is_terminal()
        && let Some(uid) = &ax.metadata.uid
    {
        let s = Summary {
            id: uid.clone(),
            name: ax.name_any(),
            namespace: key(&ax).0,
            phase: Phase::Cancelled,
            reason: Some("Deleted".into()),
            message: Some("the AgentExecution was deleted before it finished".into()),
            usage: st.usage,
            tokens_used: st.tokens_used,
            cost_usd: st.cost_usd,
            num_turns: st.num_turns,
            tool_calls: st.tool_calls.clone(),
            completion_time: Some(jiff::Timestamp::now().to_string()),
            ..Default::default()
        };
        store.finish_execution(&s, Some("Deleted"), None).await?;
    }
    let _ = ctx
        .recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "Deleted".into(),
                note: Some("finalizer ran; workspace released per its retention policy".into()),
                action: "Cleanup".into(),
                secondary: None,
            },
            &ax.object_ref(&()),
        )
        .await;
    Ok(Action::await_change())
}

async fn write_status(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    st: AgentExecutionStatus,
    event: Option<(&str, String, EventType)>,
) -> Result<(), Error> {
    write_status_with(ax, ctx, old, st, event, None).await
}

/// Writes the status with server-side apply, only when it changed, and publishes the event.
async fn write_status_with(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    mut st: AgentExecutionStatus,
    event: Option<(&str, String, EventType)>,
    blocked: Option<&Blocked>,
) -> Result<(), Error> {
    st.observed_generation = ax.metadata.generation;
    st.conditions = status::conditions(
        st.phase,
        st.reason.as_deref().unwrap_or_default(),
        st.message.as_deref().unwrap_or_default(),
        ax.metadata.generation,
        blocked,
        &old.conditions,
        &now(),
    );
    if st == *old {
        return Ok(());
    }
    let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &key(ax).0);
    let patch = json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentExecution", "status": st});
    api.patch_status(&ax.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    if let Some((reason, note, type_)) = event {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(e) = ctx.recorder.publish(&ev, &ax.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
    Ok(())
}

/// Deletes a child by name, ignoring "not found".
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
