//! Reconcile: read (the spec, its template and Secrets; the runner and its reports; the queue)
//! → `decide` (pure) → act on the decision in one fixed order. Deletions are handled here too
//! (`deleted`, `sweep`): there is no finalizer.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::context::key;
pub use super::context::{Context, ControllerConfig, Error};
use super::decide::{self, Decision, Effect, Facts, Next, Note, Stall, decide};
use super::desired;
use super::executor::{Executor, Observation};
use super::ledger;
use super::metrics::ErrorLabel;
use super::read::{Spec, queue_slot, read_spec};
use super::status;
use crate::api::{AgentExecution, AgentExecutionStatus, Phase, Reason, Resolved, RetainPolicy};
use crate::store::NewExecution;

/// The finalizer earlier versions put on every execution. None is added now (see `reconcile`);
/// executions that still carry it have it taken off.
pub const FINALIZER: &str = "agentops.dev/cleanup";
/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "agentops-controller";

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
        unless_gone(api.patch(&pvc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await)?;
    }
    let at = ax.finalizers().iter().position(|f| f == FINALIZER).unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]))
    .map_err(|e| Error::Executor(format!("finalizer patch: {e}")))?;
    let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &ns);
    unless_gone(api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch)).await)?;
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

/// One reconcile of a live execution: read what is true now, `decide`, act on the decision.
async fn apply(ax: Arc<AgentExecution>, ctx: &Context) -> Result<Action, Error> {
    let old = last_status(&ax, ctx);
    // Read: the spec (template, values, secrets), the runner with its reports.
    let read = if old.phase.is_terminal() { None } else { Some(read_spec(&ax, ctx).await?) };
    let ready = read.as_ref().and_then(|r| r.as_ref().ok());
    let mut observed = match ready {
        Some(_) => ctx.executor.observe(&ctx.client, &ax, &ctx.reports).await?,
        None => Observation::NotStarted,
    };
    if let (Some(spec), Observation::Finished { summary: Some(s), .. }) = (ready, &mut observed)
        && !ax.spec.cancel
    {
        pull_request(&ax, ctx, &spec.resolved, s).await;
    }
    tell_refusals(&ax, ctx).await;
    // A queue slot is asked for (and held, so that two reconciles never take the same one)
    // only when this execution could start now.
    let wants_slot = ready.is_some()
        && !ax.spec.cancel
        && matches!(observed, Observation::NotStarted)
        && old.phase != Phase::Running;
    let _admit = if wants_slot { Some(ctx.admit.lock().await) } else { None };
    // A spent team budget holds every new execution of its namespaces until it resets.
    let slot = if !wants_slot {
        None
    } else if let Some(why) = ctx.budgets.exhausted(&key(&ax).0) {
        Some(decide::Slot::Budget(why))
    } else {
        Some(queue_slot(&ax, ctx))
    };
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

/// A runner that pushed its branch, for an execution that asks for a pull request: the
/// controller opens it (or updates the open one of the branch) with the repository's credential,
/// which no pod holds, and the report says so before `decide` reads it. A failure turns the
/// report into `Failed`/`PullRequestFailed`; the pushed branch stays reported. The provider is
/// asked at most once per process (the ledger keeps the answer), and a new controller that
/// finds the PR open updates it rather than open a second one.
async fn pull_request(ax: &AgentExecution, ctx: &Context, r: &Resolved, s: &mut crate::api::Summary) {
    let Some(pr) = &r.pull_request else { return };
    if s.phase != Phase::Succeeded || s.reason != Some(Reason::Completed) || !s.git.pushed {
        return;
    }
    let uid = ledger::uid(ax);
    if let Some(known) = ctx.ledger.with(&uid, |e| e.pull_request.clone()).flatten() {
        return s.git.set_pull_request(*known);
    }
    let (ns, name) = key(ax);
    let failed = |s: &mut crate::api::Summary, why: String| {
        s.phase = Phase::Failed;
        s.reason = Some(Reason::PullRequestFailed);
        s.message = Some(why);
    };
    let kept = format!("; the branch {} was pushed and is kept", r.branch);
    let token = match ctx.reports.git_token(&ns, r).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return failed(s, format!("a pull request needs a token: set spec.repository.credentialsSecretRef{kept}"));
        }
        Err(e) => return failed(s, format!("cannot read the repository's token: {e}{kept}")),
    };
    let origin = crate::forge::Origin::Cluster { uid: &uid };
    let said = |m: &str| tracing::info!(namespace = %ns, execution = %name, "{m}");
    match crate::forge::open_for(pr, r, s, origin, &token, ctx.config.pull_request_retry, said).await {
        Ok(p) => {
            let note = Note {
                reason: "PullRequestOpened".into(),
                message: format!("pull request #{} {} ({}): {}", p.number, p.state, p.provider, p.url),
                warning: false,
            };
            if let Err(e) = ctx.events.publish(&note, "OpenPullRequest", &ax.object_ref(&())).await {
                tracing::warn!(error = %e, "cannot publish event");
            }
            ctx.ledger.update(&uid, |e| e.pull_request = Some(Box::new(p.clone())));
            s.git.set_pull_request(p);
        }
        Err(why) => failed(s, why),
    }
}

/// The model gateway refused requests of this execution's agent outside its allowlist (another
/// endpoint, `..`, encoded slashes): a warning Event for the execution's owner, once per new
/// batch of refusals (the gateway wakes the execution at most once a second).
async fn tell_refusals(ax: &AgentExecution, ctx: &Context) {
    tell_egress_refusals(ax, ctx).await;
    let (ns, name) = key(ax);
    let Some((n, last)) = ctx.reports.refusals(&ns, &name) else { return };
    let uid = ledger::uid(ax);
    let told = ctx.ledger.with(&uid, |e| e.refusals_told).unwrap_or(0);
    if n <= told {
        return;
    }
    ctx.ledger.update(&uid, |e| e.refusals_told = n);
    let note = Note {
        reason: "GatewayRefused".into(),
        message: match last.as_deref().and_then(|l| l.strip_prefix("model ")) {
            // A model the cluster's AgentPolicy does not allow.
            Some(model) => format!(
                "the model gateway refused {n} request(s) of the agent (last: the model {model:?}, which the cluster's AgentPolicy does not allow; see status.policy)"
            ),
            None => format!(
                "the model gateway refused {n} request(s) of the agent outside its allowlist (last: {}); it relays POST /v1/messages and /v1/messages/count_tokens only",
                last.unwrap_or_default()
            ),
        },
        warning: true,
    };
    if let Err(e) = ctx.events.publish(&note, "RelayModel", &ax.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

/// Where the controller's own log lines of an execution are numbered (after the steps').
const CONTROLLER_LOG_SEQ: i64 = 4_000_000;

/// The store's record of what the egress proxy counted (source `egress`, as on one machine):
/// the counts, then each refused `host:port`.
fn egress_log(e: &crate::api::EgressSummary) -> Vec<(i64, String, String, String)> {
    let at = jiff::Timestamp::now().to_string();
    let refused =
        if e.refused_hosts.is_empty() { String::new() } else { format!(" (refused: {})", e.refused_hosts.join(", ")) };
    let head = format!(
        "egress: {} connections, {} refused{refused}; {} bytes out, {} in",
        e.connections, e.refused, e.bytes_out, e.bytes_in
    );
    std::iter::once(head)
        .chain(e.refused_hosts.iter().map(|h| format!("refused {h}")))
        .enumerate()
        .map(|(i, line)| (CONTROLLER_LOG_SEQ + i as i64, "egress".to_string(), line, at.clone()))
        .collect()
}

/// The egress proxy refused connections of this execution's agent (a host or port outside
/// `egressHosts`, a private address): a warning Event, once per new batch of refusals. (After
/// a restart, refusals the status already counted are not told again.)
async fn tell_egress_refusals(ax: &AgentExecution, ctx: &Context) {
    let (ns, name) = key(ax);
    let Some(e) = ctx.reports.egress(&ns, &name).filter(|e| e.refused > 0) else { return };
    let uid = ledger::uid(ax);
    let recorded = ax.status.as_ref().and_then(|s| s.egress.as_ref()).map_or(0, |e| e.refused);
    let told = ctx.ledger.with(&uid, |e| e.egress_refusals_told).unwrap_or(0).max(recorded);
    if e.refused <= told {
        return;
    }
    ctx.ledger.update(&uid, |l| l.egress_refusals_told = e.refused);
    let note = Note {
        reason: "EgressRefused".into(),
        message: format!(
            "the egress proxy refused {} connection(s) of the agent (latest: {}); it connects only to spec.egressHosts, at public addresses unless spec.egress allows a private one",
            e.refused - told,
            e.refused_hosts.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ),
        warning: true,
    };
    if let Err(err) = ctx.events.publish(&note, "ProxyEgress", &ax.object_ref(&())).await {
        tracing::warn!(error = %err, "cannot publish event");
    }
}

/// The status to decide from: the cache's, or the one this process last wrote while the watch
/// has not shown it yet.
fn last_status(ax: &AgentExecution, ctx: &Context) -> AgentExecutionStatus {
    ctx.ledger.last_status(&ledger::uid(ax), ax.status.clone().unwrap_or_default())
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
        store.ensure_cluster_execution(&new_execution(ax, &spec.resolved)).await?;
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
        // What the policies decided, where only the controller writes: from now on this
        // execution counts as started and keeps these limits.
        if let Some(store) = &ctx.store {
            store.set_execution_policy(&uid, spec.resolved.policy.as_ref()).await?;
        }
        let manifest = desired::runner_manifest(&spec.effective, spec.template.as_ref())?;
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
            let summary = status::record(ax, &status, ctx.reports.latest(&uid).map(|s| s.api_retries));
            let error = (status.phase != Phase::Succeeded).then(|| status.reason.as_deref().unwrap_or_default());
            store.finish_execution(&summary, error, None).await?;
            if let Some(e) = &status.egress {
                store.append_logs(&uid, &egress_log(e)).await?;
            }
        }
        if let Some(spec) = spec {
            super::metrics::record_finished(&ctx.metrics, &spec.resolved, status.phase, &status);
        }
    }
    if write_status(ax, ctx, old, &status, d.event.as_ref()).await? {
        ctx.ledger.wrote(&uid, &status);
    }
    if has(Effect::ReleaseWorkspace)
        && !keeps_workspace(ax, status.phase)
        && let Some(pvc) = desired::desired_pvc(ax, &ctx.config.job)
    {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        delete_ignoring_missing(&api, &pvc.name_any()).await?;
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

fn new_execution<'a>(ax: &'a AgentExecution, r: &'a Resolved) -> NewExecution<'a> {
    NewExecution::new(ax.metadata.uid.as_deref().unwrap_or_default(), r)
}

/// An execution is gone (or, from an earlier version, going): stop its local runner (a Job
/// goes with its owner), record the end in the store when it had not ended, free its slot,
/// and drop what is kept for it.
pub async fn deleted(ax: &AgentExecution, ctx: &Context) -> Result<(), Error> {
    let uid = ledger::uid(ax);
    let (ns, name) = key(ax);
    let st = ctx.ledger.last_status(&uid, ax.status.clone().unwrap_or_default());
    if let Some(end) = decide::gone(&st, jiff::Timestamp::now()) {
        if matches!(ctx.executor, Executor::Local(_)) || ax.metadata.deletion_timestamp.is_some() {
            ctx.executor.stop(&ctx.client, ax).await?;
        }
        if let Some(store) = &ctx.store
            && ax.metadata.uid.is_some()
        {
            store.finish_execution(&status::record(ax, &end, None), Some("Deleted"), None).await?;
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
    for (id, ns, name) in store.unfinished_cluster().await? {
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

/// Writes the status with server-side apply, only when it changed (says whether it did), and
/// publishes the event.
async fn write_status(
    ax: &AgentExecution,
    ctx: &Context,
    old: &AgentExecutionStatus,
    st: &AgentExecutionStatus,
    event: Option<&Note>,
) -> Result<bool, Error> {
    if st == old {
        return Ok(false);
    }
    let api: Api<AgentExecution> = Api::namespaced(ctx.client.clone(), &key(ax).0);
    let patch = json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentExecution", "status": st});
    api.patch_status(&ax.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    if let Some(note) = event
        && let Err(e) = ctx.events.publish(note, "Reconcile", &ax.object_ref(&())).await
    {
        tracing::warn!(error = %e, "cannot publish event");
    }
    Ok(true)
}

pub async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    unless_gone(api.delete(name, &dp).await)
}

/// `Ok` as well when the object is not there (404): what was to be done to it is moot.
fn unless_gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether an API error is 404 Not Found.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
