//! kstatus conditions for an execution's phase, so that Argo CD, Flux and
//! `kubectl wait --for=condition=Succeeded` read it correctly. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::Phase;

/// Condition types the operator sets.
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const SUCCEEDED: &str = "Succeeded";

/// Why the controller cannot go on (a missing template or secret), if that is the case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub reason: String,
    pub message: String,
}

/// The conditions for a phase. `previous` keeps each condition's lastTransitionTime when its
/// status did not change.
///
/// - Pending/Queued/Running: Reconciling=True, Ready=False, Succeeded=Unknown.
/// - Succeeded: Ready=True, Succeeded=True, Reconciling=False, Stalled=False.
/// - Failed/TimedOut/Cancelled: Stalled=True, Ready=False, Succeeded=False (kstatus "Failed").
/// - Blocked (bad reference): Stalled=True with the reason naming it, Reconciling=False.
pub fn conditions(
    phase: Phase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    blocked: Option<&Blocked>,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let (reason, message) = match blocked {
        Some(b) => (b.reason.as_str(), b.message.as_str()),
        None => (reason, message),
    };
    let t = |v: bool| if v { "True" } else { "False" };
    let mut set: Vec<(&str, &str)> = match (phase, blocked) {
        (_, Some(_)) => vec![(READY, "False"), (RECONCILING, "False"), (STALLED, "True"), (SUCCEEDED, "Unknown")],
        (Phase::Succeeded, _) => vec![(READY, "True"), (RECONCILING, "False"), (STALLED, "False"), (SUCCEEDED, "True")],
        (Phase::Failed | Phase::TimedOut | Phase::Cancelled, _) => {
            vec![(READY, "False"), (RECONCILING, "False"), (STALLED, "True"), (SUCCEEDED, "False")]
        }
        (Phase::Pending | Phase::Queued | Phase::Running, _) => {
            vec![(READY, "False"), (RECONCILING, t(true)), (STALLED, t(false)), (SUCCEEDED, "Unknown")]
        }
    };
    set.sort_by_key(|(k, _)| *k);
    set.into_iter()
        .map(|(kind, status)| {
            let last = previous
                .iter()
                .find(|c| c.type_ == kind && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: kind.to_string(),
                status: status.to_string(),
                reason: if reason.is_empty() { phase.as_str().to_string() } else { reason.to_string() },
                message: message.to_string(),
                observed_generation: generation,
                last_transition_time: last,
            }
        })
        .collect()
}

/// The store's final record of an execution, from its final status.
pub fn record(
    ax: &crate::api::AgentExecution,
    st: &crate::api::AgentExecutionStatus,
    api_retries: Option<u64>,
) -> crate::api::Summary {
    let (namespace, name) = super::context::key(ax);
    crate::api::Summary {
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
        output: st.output.clone(),
        model: None,
        api_retries: api_retries.unwrap_or_default(),
        git: st.git.clone(),
        workspace: st.workspace.clone(),
        // The store keeps what ran (written when the execution was recorded).
        agent_config: None,
        permission_denials: st.permission_denials,
        mcp_requests: st.mcp_requests.clone(),
        egress: st.egress.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn get<'a>(c: &'a [Condition], kind: &str) -> &'a str {
        &c.iter().find(|c| c.type_ == kind).unwrap().status
    }

    #[test]
    fn running_is_reconciling_and_not_ready() {
        let c = conditions(Phase::Running, "Running", "", Some(1), None, &[], &time("2026-01-01T00:00:00Z"));
        assert_eq!(
            (get(&c, READY), get(&c, RECONCILING), get(&c, STALLED), get(&c, SUCCEEDED)),
            ("False", "True", "False", "Unknown")
        );
        assert!(c.iter().all(|c| c.observed_generation == Some(1)));
    }

    #[test]
    fn succeeded_is_ready_and_failed_is_stalled() {
        let now = time("2026-01-01T00:00:00Z");
        let ok = conditions(Phase::Succeeded, "Completed", "pushed", Some(1), None, &[], &now);
        assert_eq!((get(&ok, READY), get(&ok, SUCCEEDED), get(&ok, STALLED)), ("True", "True", "False"));
        for phase in [Phase::Failed, Phase::TimedOut, Phase::Cancelled] {
            let bad = conditions(phase, "X", "", Some(1), None, &[], &now);
            assert_eq!(
                (get(&bad, READY), get(&bad, SUCCEEDED), get(&bad, STALLED)),
                ("False", "False", "True"),
                "{phase}"
            );
        }
    }

    #[test]
    fn blocked_names_the_reference_and_transition_times_are_kept() {
        let t0 = time("2026-01-01T00:00:00Z");
        let b = Blocked { reason: "SecretNotFound".into(), message: "secret git-cred not found".into() };
        let c = conditions(Phase::Pending, "", "", Some(2), Some(&b), &[], &t0);
        let stalled = c.iter().find(|c| c.type_ == STALLED).unwrap();
        assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "SecretNotFound"));
        let t1 = time("2026-01-01T00:05:00Z");
        let again = conditions(Phase::Pending, "", "", Some(2), Some(&b), &c, &t1);
        assert_eq!(
            again.iter().find(|c| c.type_ == STALLED).unwrap().last_transition_time,
            t0,
            "unchanged status keeps its time"
        );
        let fixed = conditions(Phase::Running, "Running", "", Some(2), None, &again, &t1);
        assert_eq!(fixed.iter().find(|c| c.type_ == STALLED).unwrap().last_transition_time, t1);
    }
}
