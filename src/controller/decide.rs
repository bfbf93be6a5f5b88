//! The controller's decisions, pure: from what reconcile read about one execution (its last
//! status, its spec resolved or the reason it cannot be, what its runner is doing, the latest
//! report, the queue's answer, the clock) to the new status, the event, and the effects to
//! apply. No I/O: every transition is a table row in the tests below.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::executor::Observation;
use super::status::{self, Blocked};
use crate::api::text::{clean, clean_line};
use crate::api::{AgentExecutionStatus, Phase, Reason, Resolved, Summary};

/// Why an execution cannot start (yet): a Stalled condition naming what to fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    pub reason: Reason,
    pub message: String,
    /// Look again later (a missing template or Secret may appear); false: only a new spec helps.
    pub recheck: bool,
}

/// The queue's answer for an execution that has no runner yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Start it now.
    Start,
    /// Wait: position `0` of `1` in the queue.
    Wait(usize, usize),
    /// Wait: the namespace's team budget is spent (why, and when it resets).
    Budget(String),
}

/// Everything `decide` looks at.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The status as last written (from the cache, or what this process finished).
    pub old: &'a AgentExecutionStatus,
    pub generation: Option<i64>,
    /// The resolved spec, or why there is none.
    pub spec: Result<&'a Resolved, Stall>,
    pub cancel: bool,
    pub ttl_seconds: Option<i64>,
    /// What the runner is doing, with its reports (merged by the executor).
    pub observed: Observation,
    /// Asked only when there is no runner and nothing else decides.
    pub slot: Option<Slot>,
    /// A start creates a suspended Job that Kueue admits.
    pub kueue_queue: Option<String>,
    /// The runner's name (Job name), and the workspace it gets.
    pub runner: String,
    pub workspace: String,
    pub now: jiff::Timestamp,
}

/// What to do, in this order (`reconcile::act`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Record the execution in the store (once; idempotent).
    Remember,
    /// Stop the runner (cancel); its last report refines the final usage.
    Stop,
    /// Start the runner (create the Job, or the local process).
    Start,
    /// The runner holds no slot of ours any more (Kueue has not admitted its Job).
    Unreserve,
    /// Write the final record to the store.
    Record,
    /// Delete the workspace PVC unless the retention policy keeps it.
    ReleaseWorkspace,
    /// Drop what is kept in memory for the execution (report token, local run).
    Forget,
    /// A slot is free: wake the executions waiting for one.
    WakeQueue,
    /// `ttlSecondsAfterFinished` is up: delete the resource.
    DeleteSelf,
}

/// When to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Only when something changes (the execution, its Job, a report, a free slot).
    AwaitChange,
    /// After the controller's recheck interval (a Stalled reference may have appeared).
    Recheck,
    After(Duration),
}

/// An event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub reason: String,
    pub message: String,
    pub warning: bool,
}

/// The outcome of `decide`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: AgentExecutionStatus,
    pub event: Option<Note>,
    pub effects: Vec<Effect>,
    pub next: Next,
}

/// How often a running execution is looked at even when nothing wakes it.
const FOLLOW: Duration = Duration::from_secs(60);

/// Decides one reconcile of one execution.
pub fn decide(f: Facts<'_>) -> Decision {
    let old = f.old;
    if old.phase.is_terminal() {
        return expire(&f);
    }
    let r = match &f.spec {
        Err(stall) => return stalled(&f, stall),
        Ok(r) => *r,
    };
    if f.cancel {
        let summary = match &f.observed {
            Observation::Finished { summary: Some(s), .. } => Some(s.clone()),
            Observation::Running { progress } => progress.clone(),
            _ => None,
        };
        let mut d = finish(
            &f,
            r,
            Phase::Cancelled,
            Reason::Cancelled,
            "cancelled by spec.cancel; the usage spent so far is kept".into(),
            summary,
        );
        if !matches!(f.observed, Observation::NotStarted) {
            d.effects.insert(0, Effect::Stop);
        }
        return d;
    }
    match &f.observed {
        Observation::NotStarted if old.phase == Phase::Running => finish(
            &f,
            r,
            Phase::Failed,
            Reason::RunnerLost,
            "the runner disappeared before reporting a result".into(),
            None,
        ),
        Observation::NotStarted => match f.slot.clone().unwrap_or(Slot::Start) {
            Slot::Wait(position, total) => {
                let mut st = old.clone();
                st.phase = Phase::Queued;
                st.reason = Some(Reason::Queued);
                st.message = Some(format!("waiting for a free slot: position {position} of {total}"));
                let event = (old.phase != Phase::Queued).then(|| Note {
                    reason: Reason::Queued.to_string(),
                    message: format!("waiting for a free slot (position {position})"),
                    warning: false,
                });
                // A freed slot wakes the queue; the recheck is the net under a missed wake.
                done(&f, st, None, event, vec![Effect::Remember], Next::Recheck)
            }
            Slot::Budget(why) => {
                let mut st = old.clone();
                st.phase = Phase::Queued;
                st.reason = Some(Reason::BudgetExhausted);
                st.message = Some(why.clone());
                let event = (old.reason != Some(Reason::BudgetExhausted)).then(|| Note {
                    reason: Reason::BudgetExhausted.to_string(),
                    message: why,
                    warning: true,
                });
                // The reset wakes it; the recheck is the net under a missed wake.
                done(&f, st, None, event, vec![Effect::Remember], Next::Recheck)
            }
            Slot::Start => {
                let mut st = old.clone();
                st.job_name = Some(f.runner.clone());
                st.git.branch = Some(r.branch.clone());
                // Fixed here, with the runner's manifest: a template edited later changes neither.
                st.agent_config_hash = Some(r.agent_config.hash());
                st.policy = r.policy.clone();
                let (event, next) = match &f.kueue_queue {
                    Some(queue) => {
                        st.phase = Phase::Queued;
                        st.reason = Some(Reason::AwaitingAdmission);
                        st.message = Some(awaiting(queue));
                        (note(Reason::AwaitingAdmission, awaiting(queue), false), Next::After(FOLLOW))
                    }
                    None => {
                        // The status the next look at a running runner gives too: one write.
                        st.phase = Phase::Running;
                        st.reason = Some(Reason::Running);
                        st.message = Some(format!("the agent is working on {}", r.repo_url));
                        st.start_time = Some(f.now.to_string());
                        st.workspace = Some(f.workspace.clone());
                        (note(Reason::Started, format!("runner {} started", f.runner), false), Next::After(FOLLOW))
                    }
                };
                done(&f, st, None, event, vec![Effect::Remember, Effect::Start], next)
            }
        },
        Observation::Suspended => {
            let queue = f.kueue_queue.clone().unwrap_or_else(|| "?".into());
            let mut st = old.clone();
            st.phase = Phase::Queued;
            st.reason = Some(Reason::AwaitingAdmission);
            st.message = Some(awaiting(&queue));
            st.job_name = Some(f.runner.clone());
            let event = (old.reason != Some(Reason::AwaitingAdmission)).then(|| Note {
                reason: Reason::AwaitingAdmission.to_string(),
                message: awaiting(&queue),
                warning: false,
            });
            done(&f, st, None, event, vec![Effect::Unreserve], Next::After(FOLLOW))
        }
        Observation::Running { progress } => {
            let mut st = old.clone();
            st.job_name = Some(f.runner.clone());
            if st.start_time.is_none() {
                st.start_time = Some(f.now.to_string());
            }
            if let Some(p) = progress {
                with_report(&mut st, p);
            }
            st.phase = Phase::Running;
            st.reason = Some(Reason::Running);
            st.message = Some(format!("the agent is working on {}", r.repo_url));
            done(&f, st, None, None, vec![], Next::After(FOLLOW))
        }
        Observation::Finished { summary, failed, deadline_exceeded, cause } => {
            let summary = summary.clone();
            let (phase, reason, message) = match (&summary, failed, deadline_exceeded) {
                (_, _, true) => {
                    (Phase::TimedOut, Reason::Timeout, "the Job exceeded its deadline (spec.timeout)".into())
                }
                (Some(s), _, _) => {
                    (s.phase, s.reason.clone().unwrap_or(Reason::Completed), s.message.clone().unwrap_or_default())
                }
                // Success is only ever what a readable report says: a missing, truncated (the
                // kubelet cuts termination messages at 4 KiB) or unparsable one is a failure,
                // never "Succeeded" with work that may not be anywhere.
                (None, false, _) => (
                    Phase::Failed,
                    Reason::ReportInvalid,
                    match cause {
                        Some(c) => format!("the runner finished but its report is missing or unreadable: {c}"),
                        None => "the runner finished without a report; see the runner's logs".into(),
                    },
                ),
                (None, true, _) => (
                    Phase::Failed,
                    Reason::RunnerFailed,
                    match cause {
                        Some(c) => format!("the runner failed without a report: {c}"),
                        None => "the runner failed without a report; see the runner's logs".into(),
                    },
                ),
            };
            finish(&f, r, phase, reason, message, summary)
        }
    }
}

/// The last record of an execution deleted before it ended (`None`: it had ended; its record
/// stands): Cancelled, reason `Deleted`, the usage it had so far.
pub fn gone(old: &AgentExecutionStatus, now: jiff::Timestamp) -> Option<AgentExecutionStatus> {
    if old.phase.is_terminal() {
        return None;
    }
    let mut st = old.clone();
    st.phase = Phase::Cancelled;
    st.reason = Some(Reason::Deleted);
    st.message = Some("the AgentExecution was deleted before it finished".into());
    st.completion_time = Some(now.to_string());
    Some(st)
}

fn awaiting(queue: &str) -> String {
    format!("the Job waits for Kueue to admit it (queue {queue})")
}

fn note(reason: Reason, message: String, warning: bool) -> Option<Note> {
    Some(Note { reason: reason.to_string(), message, warning })
}

/// Copies a runner report's figures into a status.
pub fn with_report(st: &mut AgentExecutionStatus, s: &Summary) {
    st.usage = s.usage;
    st.tokens_used = s.tokens_used;
    st.cost_usd = s.cost_usd;
    st.num_turns = s.num_turns;
    // What a runner reported is shown by kubectl: no control characters in it.
    st.tool_calls = s.tool_calls.bounded(usize::MAX);
    st.permission_denials = st.permission_denials.max(s.permission_denials);
    if !s.mcp_requests.is_empty() {
        // Server names are the spec's (checked names), bounded by its 16 servers.
        st.mcp_requests = s.mcp_requests.clone();
    }
    if s.egress.is_some() {
        // The controller's own proxy's count (`Executor::observe`), never a runner's word.
        st.egress = s.egress.clone();
    }
    st.session_id = s.session_id.as_deref().map(|t| clean_line(t).into_owned()).or(st.session_id.take());
    if let Some(r) = &s.result {
        st.result = Some(clean(r).into_owned());
    }
    if s.output.is_some() {
        st.output = s.output.clone();
    }
    if s.git.branch.is_some() {
        st.git = s.git.clone();
    }
}

/// The end: final status, the record, the workspace, memory, a free slot.
fn finish(
    f: &Facts<'_>,
    _r: &Resolved,
    phase: Phase,
    reason: Reason,
    message: String,
    summary: Option<Summary>,
) -> Decision {
    let mut st = f.old.clone();
    if let Some(s) = &summary {
        with_report(&mut st, s);
    }
    let message = clean(&message).into_owned();
    st.phase = phase;
    st.reason = Some(reason.clone());
    st.message = Some(message.clone());
    st.completion_time = Some(f.now.to_string());
    let start = st.start_time.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let ms = summary
        .as_ref()
        .map(|s| s.duration_ms)
        .filter(|d| *d > 0)
        .or_else(|| start.map(|s| f.now.duration_since(s).as_millis().max(0) as u64));
    st.duration_ms = ms;
    st.duration = ms.map(|ms| humantime::format_duration(Duration::from_millis(ms / 1000 * 1000)).to_string());
    // Finish events are named after the phase (Succeeded, Failed, ...), the reason in the note.
    let event = Some(Note {
        reason: phase.as_str().into(),
        message: format!("{reason}: {message}"),
        warning: phase != Phase::Succeeded,
    });
    let effects = vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue];
    let mut d = done(f, st, None, event, effects, Next::AwaitChange);
    // The TTL counts from now.
    if let Some(ttl) = f.ttl_seconds {
        if ttl <= 0 {
            d.effects.push(Effect::DeleteSelf);
        } else {
            d.next = Next::After(Duration::from_secs(ttl as u64));
        }
    }
    d
}

/// A finished execution: only its TTL is left.
fn expire(f: &Facts<'_>) -> Decision {
    let st = f.old.clone();
    let Some(ttl) = f.ttl_seconds else {
        return Decision { status: st, event: None, effects: vec![], next: Next::AwaitChange };
    };
    let ended = st.completion_time.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()).unwrap_or(f.now);
    let age = f.now.duration_since(ended).as_secs();
    if age >= ttl {
        return Decision { status: st, event: None, effects: vec![Effect::DeleteSelf], next: Next::AwaitChange };
    }
    Decision {
        status: st,
        event: None,
        effects: vec![],
        next: Next::After(Duration::from_secs((ttl - age).max(1) as u64)),
    }
}

fn stalled(f: &Facts<'_>, stall: &Stall) -> Decision {
    let old = f.old;
    let mut st = old.clone();
    st.phase = Phase::Pending;
    st.reason = Some(stall.reason.clone());
    st.message = Some(stall.message.clone());
    let same = old.reason.as_ref() == Some(&stall.reason) && old.message.as_deref() == Some(stall.message.as_str());
    let event =
        (!same).then(|| Note { reason: stall.reason.to_string(), message: stall.message.clone(), warning: true });
    let b = Blocked { reason: stall.reason.to_string(), message: stall.message.clone() };
    let next = if stall.recheck { Next::Recheck } else { Next::AwaitChange };
    done(f, st, Some(&b), event, vec![], next)
}

/// Fills in what every status carries (observed generation, kstatus conditions).
fn done(
    f: &Facts<'_>,
    mut st: AgentExecutionStatus,
    blocked: Option<&Blocked>,
    event: Option<Note>,
    effects: Vec<Effect>,
    next: Next,
) -> Decision {
    st.observed_generation = f.generation;
    st.conditions = status::conditions(
        st.phase,
        st.reason.as_deref().unwrap_or_default(),
        st.message.as_deref().unwrap_or_default(),
        f.generation,
        blocked,
        &f.old.conditions,
        &Time(f.now),
    );
    Decision { status: st, event, effects, next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Usage, parse_manifest, resolve};

    fn resolved() -> Resolved {
        let m = parse_manifest(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {name: a}\nspec: {prompt: p, repository: {url: 'https://h/r.git'}}\n",
        )
        .unwrap();
        resolve(&m.execution, &[]).unwrap()
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn status(phase: Phase, reason: &str) -> AgentExecutionStatus {
        AgentExecutionStatus { phase, reason: Some(Reason::from(reason)), ..Default::default() }
    }

    fn report(phase: Phase, reason: &str, tokens: u64) -> Summary {
        Summary {
            phase,
            reason: Some(Reason::from(reason)),
            message: Some(format!("{reason} message")),
            tokens_used: tokens,
            usage: Usage { input_tokens: tokens, ..Default::default() },
            duration_ms: 1500,
            ..Default::default()
        }
    }

    fn facts<'a>(old: &'a AgentExecutionStatus, r: &'a Resolved, observed: Observation) -> Facts<'a> {
        Facts {
            old,
            generation: Some(1),
            spec: Ok(r),
            cancel: false,
            ttl_seconds: None,
            observed,
            slot: None,
            kueue_queue: None,
            runner: "agentops-a".into(),
            workspace: "emptyDir".into(),
            now: at("2026-01-01T00:10:00Z"),
        }
    }

    fn finished(summary: Option<Summary>, failed: bool, deadline: bool, cause: Option<&str>) -> Observation {
        Observation::Finished { summary, failed, deadline_exceeded: deadline, cause: cause.map(String::from) }
    }

    fn cond<'a>(d: &'a Decision, kind: &str) -> &'a str {
        &d.status.conditions.iter().find(|c| c.type_ == kind).unwrap().status
    }

    /// One row per transition: (what, old status, observation, tweak, phase, reason, effects).
    #[test]
    fn every_transition() {
        let r = resolved();
        let pending = AgentExecutionStatus::default();
        let running = AgentExecutionStatus {
            phase: Phase::Running,
            reason: Some(Reason::Running),
            start_time: Some("2026-01-01T00:00:00Z".into()),
            ..Default::default()
        };
        let queued = status(Phase::Queued, "Queued");
        let succeeded = status(Phase::Succeeded, "Completed");
        type Tweak = fn(&mut Facts<'_>);
        let none: Tweak = |_| {};
        type Row<'a> = (&'a str, &'a AgentExecutionStatus, Observation, Tweak, Phase, &'a str, Vec<Effect>);
        let rows: Vec<Row<'_>> = vec![
            (
                "new, a slot: start",
                &pending,
                Observation::NotStarted,
                none,
                Phase::Running,
                "Running",
                vec![Effect::Remember, Effect::Start],
            ),
            (
                "new, no slot: queue",
                &pending,
                Observation::NotStarted,
                |f| f.slot = Some(Slot::Wait(2, 3)),
                Phase::Queued,
                "Queued",
                vec![Effect::Remember],
            ),
            (
                "queued, a slot: start",
                &queued,
                Observation::NotStarted,
                |f| f.slot = Some(Slot::Start),
                Phase::Running,
                "Running",
                vec![Effect::Remember, Effect::Start],
            ),
            (
                "kueue: started suspended, queued",
                &pending,
                Observation::NotStarted,
                |f| f.kueue_queue = Some("team".into()),
                Phase::Queued,
                "AwaitingAdmission",
                vec![Effect::Remember, Effect::Start],
            ),
            (
                "suspended job: awaiting admission",
                &running,
                Observation::Suspended,
                none,
                Phase::Queued,
                "AwaitingAdmission",
                vec![Effect::Unreserve],
            ),
            (
                "admitted: running",
                &queued,
                Observation::Running { progress: None },
                none,
                Phase::Running,
                "Running",
                vec![],
            ),
            (
                "running with progress",
                &running,
                Observation::Running { progress: Some(report(Phase::Running, "Running", 42)) },
                none,
                Phase::Running,
                "Running",
                vec![],
            ),
            (
                "runner gone while running: lost",
                &running,
                Observation::NotStarted,
                none,
                Phase::Failed,
                "RunnerLost",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "finished with a report",
                &running,
                finished(Some(report(Phase::Succeeded, "Completed", 9)), false, false, None),
                none,
                Phase::Succeeded,
                "Completed",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "finished, the report from the channel",
                &running,
                finished(Some(report(Phase::Failed, "PushRejected", 9)), false, false, None),
                none,
                Phase::Failed,
                "PushRejected",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "finished ok, no report: never a success",
                &running,
                finished(None, false, false, None),
                none,
                Phase::Failed,
                "ReportInvalid",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "finished ok, a truncated report",
                &running,
                finished(
                    None,
                    false,
                    false,
                    Some("step finish: {\"phase\":\"Succeeded\",\"toolCalls\":{\"byTool\":{\"aaaa"),
                ),
                none,
                Phase::Failed,
                "ReportInvalid",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "failed, no report: the cause",
                &running,
                finished(None, true, false, Some("error: disk full")),
                none,
                Phase::Failed,
                "RunnerFailed",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "deadline",
                &running,
                finished(Some(report(Phase::Running, "Running", 5)), true, true, None),
                none,
                Phase::TimedOut,
                "Timeout",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "cancel while running",
                &running,
                Observation::Running { progress: None },
                |f| f.cancel = true,
                Phase::Cancelled,
                "Cancelled",
                vec![Effect::Stop, Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "cancel before start",
                &queued,
                Observation::NotStarted,
                |f| f.cancel = true,
                Phase::Cancelled,
                "Cancelled",
                vec![Effect::Record, Effect::ReleaseWorkspace, Effect::Forget, Effect::WakeQueue],
            ),
            (
                "missing secret: stalled",
                &pending,
                Observation::NotStarted,
                |f| {
                    f.spec = Err(Stall { reason: Reason::SecretNotFound, message: "no git-cred".into(), recheck: true })
                },
                Phase::Pending,
                "SecretNotFound",
                vec![],
            ),
            (
                "finished: nothing more",
                &succeeded,
                Observation::NotStarted,
                none,
                Phase::Succeeded,
                "Completed",
                vec![],
            ),
        ];
        for (what, old, observed, tweak, phase, reason, effects) in rows {
            let mut f = facts(old, &r, observed);
            tweak(&mut f);
            let d = decide(f);
            assert_eq!((d.status.phase, d.status.reason.as_deref()), (phase, Some(reason)), "{what}");
            assert_eq!(d.effects, effects, "{what}");
            if !old.phase.is_terminal() {
                assert_eq!(d.status.observed_generation, Some(1), "{what}: every written status says which spec");
            }
        }
    }

    #[test]
    fn a_written_status_reads_back_equal_from_the_api() {
        // The ledger keeps a written status until the watch shows an equal one: a status that
        // does not survive a JSON round trip unchanged would be kept for the whole run.
        let r = resolved();
        let old = AgentExecutionStatus::default();
        let mut f = facts(&old, &r, Observation::NotStarted);
        f.slot = Some(Slot::Start);
        let started = decide(f).status;
        let running =
            decide(facts(&started, &r, Observation::Running { progress: Some(report(Phase::Running, "Running", 7)) }))
                .status;
        for st in [started, running] {
            let back: AgentExecutionStatus = serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap();
            assert_eq!(back, st);
        }
    }

    #[test]
    fn a_deletion_ends_what_had_not_ended_and_keeps_its_usage() {
        let now: jiff::Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        for (phase, ends) in [
            (Phase::Pending, true),
            (Phase::Queued, true),
            (Phase::Running, true),
            (Phase::Succeeded, false),
            (Phase::Failed, false),
            (Phase::Cancelled, false),
            (Phase::TimedOut, false),
        ] {
            let old = AgentExecutionStatus { phase, tokens_used: 42, ..Default::default() };
            let st = gone(&old, now);
            assert_eq!(st.is_some(), ends, "{phase:?}");
            if let Some(st) = st {
                assert_eq!((st.phase, st.reason, st.tokens_used), (Phase::Cancelled, Some(Reason::Deleted), 42));
                assert_eq!(st.completion_time.as_deref(), Some("2026-01-01T00:10:00Z"));
            }
        }
    }

    #[test]
    fn conditions_follow_the_phase_and_a_stall_is_not_in_progress() {
        let r = resolved();
        let old = AgentExecutionStatus::default();
        let mut f = facts(&old, &r, Observation::NotStarted);
        f.spec = Err(Stall { reason: Reason::TemplateNotFound, message: "no t".into(), recheck: true });
        let d = decide(f);
        assert_eq!((cond(&d, "Stalled"), cond(&d, "Reconciling")), ("True", "False"));
        assert_eq!(d.next, Next::Recheck);
        assert!(d.event.as_ref().is_some_and(|e| e.warning));
        // The same stall again: no second event.
        let again = decide(Facts {
            spec: Err(Stall { reason: Reason::TemplateNotFound, message: "no t".into(), recheck: true }),
            ..facts(&d.status, &r, Observation::NotStarted)
        });
        assert_eq!(again.event, None);
        // An invalid spec waits for a new spec, not a timer.
        let bad = decide(Facts {
            spec: Err(Stall { reason: Reason::InvalidSpec, message: "x".into(), recheck: false }),
            ..facts(&old, &r, Observation::NotStarted)
        });
        assert_eq!(bad.next, Next::AwaitChange);
    }

    #[test]
    fn final_usage_comes_from_the_report_and_the_cause_is_in_the_message() {
        let r = resolved();
        let running = AgentExecutionStatus {
            phase: Phase::Running,
            start_time: Some("2026-01-01T00:00:00Z".into()),
            ..Default::default()
        };
        let d = decide(facts(
            &running,
            &r,
            finished(Some(report(Phase::Succeeded, "Completed", 1234)), false, false, None),
        ));
        assert_eq!((d.status.tokens_used, d.status.duration_ms), (1234, Some(1500)), "the runner's own duration");
        assert_eq!(d.status.completion_time.as_deref(), Some("2026-01-01T00:10:00Z"));
        let d = decide(facts(&running, &r, finished(None, true, false, Some("error: cannot open the store"))));
        assert!(d.status.message.unwrap().contains("cannot open the store"));
        assert_eq!(d.status.duration_ms, Some(600_000), "from the start time when the runner gave none");
        // Cancel keeps the usage reported so far.
        let mut f =
            facts(&running, &r, Observation::Running { progress: Some(report(Phase::Running, "Running", 700)) });
        f.cancel = true;
        let d = decide(f);
        assert_eq!((d.status.phase, d.status.usage.input_tokens), (Phase::Cancelled, 700));
    }

    #[test]
    fn ttl_deletes_when_due_and_waits_otherwise() {
        let r = resolved();
        let done_at = AgentExecutionStatus {
            completion_time: Some("2026-01-01T00:09:00Z".into()),
            ..status(Phase::Succeeded, "Completed")
        };
        let mut f = facts(&done_at, &r, Observation::NotStarted);
        f.ttl_seconds = Some(120);
        assert_eq!(decide(f.clone()).next, Next::After(Duration::from_secs(60)));
        f.ttl_seconds = Some(30);
        assert_eq!(decide(f).effects, vec![Effect::DeleteSelf]);
        // Finishing with a TTL of 0 deletes right away.
        let running = status(Phase::Running, "Running");
        let mut f = facts(&running, &r, finished(None, false, false, None));
        f.ttl_seconds = Some(0);
        assert_eq!(decide(f).effects.last(), Some(&Effect::DeleteSelf));
    }

    #[test]
    fn queued_emits_its_event_once() {
        let r = resolved();
        let old = AgentExecutionStatus::default();
        let mut f = facts(&old, &r, Observation::NotStarted);
        f.slot = Some(Slot::Wait(1, 2));
        let d = decide(f);
        assert!(d.event.is_some());
        let mut f = facts(&d.status, &r, Observation::NotStarted);
        f.slot = Some(Slot::Wait(1, 2));
        assert_eq!(decide(f).event, None);
    }
}
