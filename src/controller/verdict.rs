//! Whom the controller believes about a runner pod's execution, and for what. Each step says
//! only what it can know:
//!
//! - the **publish** step (trusted code, after the agent, before any hook over the agent's
//!   workspace) reports how the execution ended up to and including the push, and what git did;
//!   it alone holds the report token, so nothing after it can speak in its name;
//! - the **git relay** saw which commit the branch was pushed to;
//! - the **finish** step runs the post or error hooks over a workspace the agent wrote, beside
//!   its own termination log: its word can only make a successful execution fail (a post hook
//!   failed), never make a failed one succeed, change what git did or name a pull request;
//! - usage comes from the gateway (applied by the caller).
//!
//! A report that contradicts another is `ReportInvalid`, never believed.

use crate::api::{Phase, Reason, Summary};

/// What the finish step may say on its own: a post hook failed, or it could not finish.
const FINISH_MAY_SAY: &[Reason] = &[Reason::PostHookFailed, Reason::RunnerFailed];

/// The execution's summary from the finish step's termination message (`finish`, None when
/// missing or unreadable), that container's exit status, the publish step's report
/// (`publish`, terminal phase) and what the relay saw (`relay`: None without a record, else the
/// commit pushed, if any). None: no summary to believe (the caller reports the cause).
pub fn judge(
    finish: Option<Summary>,
    finish_exit: Option<i32>,
    publish: Option<Summary>,
    relay: Option<Option<String>>,
) -> Option<Summary> {
    // Without the finish step's message (the pod gone, or a hook kept it from being written,
    // but not a finish step that failed), the publish step's report is the execution's.
    let finish_ran = finish_exit.is_none_or(|c| c == 0);
    let mut s = finish.or_else(|| publish.clone().filter(|p| finish_ran && p.phase.is_terminal()))?;
    let invalid = |s: &mut Summary, why: String| {
        s.phase = Phase::Failed;
        s.reason = Some(Reason::ReportInvalid);
        s.message = Some(why);
    };
    match publish.filter(|p| p.phase.is_terminal()) {
        Some(p) => {
            let (said, claim) = (s.phase, s.reason.clone());
            s.git = p.git.clone();
            if p.output.is_some() {
                s.output = p.output.clone();
            }
            let finish_failed = said != Phase::Succeeded && claim.as_ref().is_some_and(|r| FINISH_MAY_SAY.contains(r));
            if p.phase == Phase::Succeeded && finish_failed {
                // A post hook failed (or finish could not end): the finish step's own word.
            } else if p.phase != Phase::Succeeded || said == Phase::Succeeded {
                s.phase = p.phase;
                s.reason = p.reason.clone();
                s.message = p.message.clone();
            } else {
                let claim = claim.map_or_else(|| "no reason".to_string(), |r| r.to_string());
                let published = p.reason.as_ref().map_or_else(|| "Succeeded".to_string(), |r| r.to_string());
                invalid(
                    &mut s,
                    format!(
                        "the finish step reported {} ({claim}) after the publish step reported {published}; neither is believed",
                        said.as_str()
                    ),
                );
            }
        }
        None if s.git.pushed || s.git.commit.is_some() || s.git.pull_request_url.is_some() => {
            // Only the publish step knows what git did; its report never arrived.
            let seen = relay.clone().flatten();
            if s.git.pull_request.is_some()
                || s.git.pull_request_url.is_some()
                || !s.git.pushed
                || seen.is_none()
                || seen != s.git.commit
            {
                let commit = s.git.commit.clone().unwrap_or_default();
                s.git = Default::default();
                invalid(
                    &mut s,
                    format!(
                        "the finish step reported commit {commit:.12} but the publish step never did, and the git relay did not see it pushed"
                    ),
                );
            }
        }
        None => {}
    }
    if s.phase == Phase::Succeeded && finish_exit.is_some_and(|c| c != 0) {
        invalid(
            &mut s,
            format!("the finish step reported success but exited with status {}", finish_exit.unwrap_or_default()),
        );
    }
    if s.git.pushed
        && let Some(seen) = relay
        && seen != s.git.commit
    {
        let saw = seen.map_or_else(|| "no push".to_string(), |c| format!("commit {c:.12}"));
        let said = s.git.commit.clone().unwrap_or_default();
        invalid(&mut s, format!("the report says commit {said:.12} was pushed; the git relay saw {saw}"));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GitResult;

    const C: &str = "1111111111111111111111111111111111111111";

    fn pushed(commit: &str) -> GitResult {
        GitResult { branch: Some("agentops/x".into()), commit: Some(commit.into()), pushed: true, ..Default::default() }
    }

    fn report(phase: Phase, reason: Reason, git: GitResult) -> Summary {
        Summary { phase, reason: Some(reason), message: Some("m".into()), git, ..Default::default() }
    }

    fn outcome(s: &Option<Summary>) -> (Phase, Reason, bool) {
        let s = s.as_ref().unwrap();
        (s.phase, s.reason.clone().unwrap(), s.git.pushed)
    }

    #[test]
    fn a_forged_success_after_a_failed_run_is_not_believed() {
        // The attack: a hook in `finish` wrote Succeeded, pushed, a commit and a pull request
        // for a run that had failed with MaxTurns (the publish step said so).
        let mut forged = report(Phase::Succeeded, Reason::Completed, pushed(C));
        forged.git.pull_request_url = Some("https://example.com/pr/1".into());
        let publish = report(Phase::Failed, Reason::MaxTurns, GitResult::default());
        let s = judge(Some(forged), Some(0), Some(publish), Some(None));
        assert_eq!(outcome(&s), (Phase::Failed, Reason::MaxTurns, false));
        assert_eq!(s.as_ref().unwrap().git.pull_request_url, None);
    }

    #[test]
    fn the_finish_step_may_only_make_a_success_fail() {
        let publish = || Some(report(Phase::Succeeded, Reason::Completed, pushed(C)));
        let hook_failed = report(Phase::Failed, Reason::PostHookFailed, GitResult::default());
        let s = judge(Some(hook_failed), Some(0), publish(), Some(Some(C.into())));
        assert_eq!(outcome(&s), (Phase::Failed, Reason::PostHookFailed, true), "git stays the publish step's");
        let ok = report(Phase::Succeeded, Reason::Completed, GitResult::default());
        let s = judge(Some(ok.clone()), Some(0), publish(), Some(Some(C.into())));
        assert_eq!(outcome(&s), (Phase::Succeeded, Reason::Completed, true));
        // Any other word from finish contradicts the publish step.
        let other = report(Phase::Failed, Reason::MaxTurns, GitResult::default());
        let s = judge(Some(other), Some(0), publish(), Some(Some(C.into())));
        assert_eq!(outcome(&s).1, Reason::ReportInvalid);
        // A finish step that exited non-zero is never Succeeded.
        let s = judge(Some(ok), Some(1), publish(), Some(Some(C.into())));
        assert_eq!(outcome(&s).1, Reason::ReportInvalid);
    }

    #[test]
    fn a_push_the_relay_did_not_see_is_not_believed() {
        let publish = Some(report(Phase::Succeeded, Reason::Completed, pushed(C)));
        let ok = report(Phase::Succeeded, Reason::Completed, GitResult::default());
        let s = judge(Some(ok.clone()), Some(0), publish.clone(), Some(Some("2".repeat(40))));
        assert_eq!(outcome(&s).1, Reason::ReportInvalid);
        let s = judge(Some(ok.clone()), Some(0), publish.clone(), Some(None));
        assert_eq!(outcome(&s).1, Reason::ReportInvalid);
        // No record (a restart lost it): the publish step's word stands.
        let s = judge(Some(ok), Some(0), publish, None);
        assert_eq!(outcome(&s), (Phase::Succeeded, Reason::Completed, true));
    }

    #[test]
    fn without_the_publish_report_git_comes_only_from_the_relay() {
        let claims = report(Phase::Succeeded, Reason::Completed, pushed(C));
        let s = judge(Some(claims.clone()), Some(0), None, Some(Some(C.into())));
        assert_eq!(outcome(&s), (Phase::Succeeded, Reason::Completed, true));
        let s = judge(Some(claims.clone()), Some(0), None, Some(None));
        assert_eq!(outcome(&s), (Phase::Failed, Reason::ReportInvalid, false));
        let s = judge(Some(claims), Some(0), None, None);
        assert_eq!(outcome(&s), (Phase::Failed, Reason::ReportInvalid, false));
        let nothing = report(Phase::Succeeded, Reason::NoChanges, GitResult::default());
        let s = judge(Some(nothing), Some(0), None, None);
        assert_eq!(outcome(&s), (Phase::Succeeded, Reason::NoChanges, false));
        assert!(judge(None, Some(0), None, None).is_none());
    }

    #[test]
    fn without_the_finish_message_the_publish_report_stands_unless_finish_failed() {
        let publish = || Some(report(Phase::Succeeded, Reason::Completed, pushed(C)));
        let s = judge(None, Some(0), publish(), Some(Some(C.into())));
        assert_eq!(outcome(&s), (Phase::Succeeded, Reason::Completed, true));
        let s = judge(None, None, publish(), None);
        assert_eq!(outcome(&s), (Phase::Succeeded, Reason::Completed, true));
        assert!(judge(None, Some(2), publish(), None).is_none(), "the caller reports the failed step");
    }
}
