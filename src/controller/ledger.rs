//! What this controller process keeps about each execution, in one place, keyed by the
//! execution's uid: a new execution with an old name is a new entry, never the old one's.
//!
//! Everything here is a cache of what the API server, the runner or its Secret also hold, or
//! lives only as long as the run: a restarted controller starts with an empty ledger and
//! rebuilds what it needs (the report token from the runner Secret, the status from the watch).
//! The model gateway's accounts and the git relay's routes are those services' own routing
//! tables (addressed by `namespace/name` in the request path); they are opened when a runner
//! starts and closed by the same `forget` that ends a ledger entry (`Reports::forget`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use crate::api::{AgentExecution, AgentExecutionStatus, Summary};

/// One execution's entry.
#[derive(Debug, Default)]
pub struct Entry {
    /// When this process started its runner: the watch caches may not show the runner or its
    /// Running status yet (the queue counts it as active meanwhile; its Job is taken as there).
    pub started: Option<Instant>,
    /// The last status this process wrote, until the watch cache shows it: a reconcile that
    /// reads a stale cache decides from what is true (it must not finish the same execution
    /// twice, nor write the same status again).
    /// Kept as its JSON: during a cold start of 10,000 executions nearly all of them wait here
    /// at once for the watch (heap profile: ~2.8 KB each as a struct, ~0.7 KB as JSON).
    pub written: Option<Box<[u8]>>,
    /// The token its runner presents when it reports.
    pub report_token: Option<String>,
    /// The runner's latest report (progress, or its final word when the other way lost it).
    pub latest: Option<Box<Summary>>,
    /// Its runner process, with the local executor.
    pub local: Option<Box<LocalRun>>,
    /// The pull request this process opened for it (a reconcile that runs again before the
    /// final status is written does not call the provider again).
    pub pull_request: Option<Box<crate::api::PullRequestResult>>,
    /// Gateway refusals already told in an Event.
    pub refusals_told: u64,
    /// Egress proxy refusals already told in an Event.
    pub egress_refusals_told: u64,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.started.is_none()
            && self.written.is_none()
            && self.report_token.is_none()
            && self.latest.is_none()
            && self.local.is_none()
            && self.pull_request.is_none()
            && self.refusals_told == 0
            && self.egress_refusals_told == 0
    }
}

/// A runner that is a child process of the controller.
#[derive(Debug, Default)]
pub struct LocalRun {
    pub pid: Option<u32>,
    /// The report, the exit code, and the runner's last error lines.
    pub done: Option<(Option<Summary>, i32, Option<String>)>,
    /// Private files of this run (manifest, report token, secrets), removed when it is forgotten.
    pub dir: PathBuf,
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The ledger: one map, one lock.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: Mutex<HashMap<String, Entry>>,
}

/// The key of an execution: its uid (the API server always sets one; objects built by hand
/// without one fall back to `namespace/name`).
pub fn uid(ax: &AgentExecution) -> String {
    ax.metadata.uid.clone().unwrap_or_else(|| {
        let (ns, name) = super::context::key(ax);
        format!("{ns}/{name}")
    })
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic elsewhere while holding the lock leaves the map usable: every write is one
        // field assignment.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes an execution's entry, creating it.
    pub fn update<R>(&self, uid: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        f(self.lock().entry(uid.to_string()).or_default())
    }

    /// Reads or changes an execution's entry, if it has one.
    pub fn with<R>(&self, uid: &str, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.lock().get_mut(uid).map(f)
    }

    /// The status to decide from: the cache's, unless this process wrote a newer one that the
    /// watch has not delivered yet (only this controller writes the status). Once the cache
    /// shows an end, the entry has served its purpose and goes.
    pub fn last_status(&self, uid: &str, cached: AgentExecutionStatus) -> AgentExecutionStatus {
        let mut entries = self.lock();
        if cached.phase.is_terminal() {
            entries.remove(uid);
            return cached;
        }
        let Some(e) = entries.get_mut(uid) else { return cached };
        let Some(w) = e.written.take() else { return cached };
        if serde_json::to_vec(&cached).is_ok_and(|c| *c == *w) {
            // The cache caught up: nothing more to remember.
            if e.is_empty() {
                entries.remove(uid);
            }
            return cached;
        }
        let last = serde_json::from_slice(&w).unwrap_or(cached);
        e.written = Some(w);
        last
    }

    /// The status to judge this execution by without changing what is kept: the one this
    /// process last wrote when the cache has not shown it yet (the queue reads every
    /// execution this way: a slot freed a moment ago must count as free).
    pub fn peek_status(&self, uid: &str, cached: &AgentExecutionStatus) -> Option<AgentExecutionStatus> {
        if cached.phase.is_terminal() {
            return None;
        }
        let entries = self.lock();
        let w = entries.get(uid)?.written.as_ref()?;
        serde_json::from_slice(w).ok()
    }

    /// Remembers the status this process just wrote.
    pub fn wrote(&self, uid: &str, status: &AgentExecutionStatus) {
        if let Ok(json) = serde_json::to_vec(status) {
            self.update(uid, |e| e.written = Some(json.into_boxed_slice()));
        }
    }

    /// Executions started by this process whose start the cache may not show yet.
    pub fn starting(&self) -> HashSet<String> {
        self.lock().iter().filter(|(_, e)| e.started.is_some()).map(|(uid, _)| uid.clone()).collect()
    }

    /// Whether this process started the execution's runner less than `within` ago.
    pub fn started_within(&self, uid: &str, within: std::time::Duration) -> bool {
        self.lock().get(uid).and_then(|e| e.started).is_some_and(|at| at.elapsed() < within)
    }

    /// Ends a run: drops its token, reports and runner (with its private files), and keeps
    /// only the final status until the watch cache shows it.
    pub fn end_run(&self, uid: &str) {
        let mut entries = self.lock();
        let keep = entries.get_mut(uid).and_then(|e| e.written.take());
        match keep {
            Some(written) => {
                entries.insert(uid.to_string(), Entry { written: Some(written), ..Default::default() });
            }
            None => {
                entries.remove(uid);
            }
        }
    }

    /// Drops the whole entry (the execution is gone).
    pub fn remove(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// Whether nothing is kept (tests).
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;

    fn status(phase: Phase) -> AgentExecutionStatus {
        AgentExecutionStatus { phase, ..Default::default() }
    }

    #[test]
    fn a_final_status_outlives_the_run_until_the_cache_shows_it() {
        let l = Ledger::default();
        l.update("u1", |e| {
            e.started = Some(Instant::now());
            e.report_token = Some("t".into());
            e.latest = Some(Box::default());
        });
        assert_eq!(l.starting(), HashSet::from(["u1".to_string()]));
        l.wrote("u1", &status(Phase::Succeeded));
        l.end_run("u1");
        assert!(l.starting().is_empty());
        assert_eq!(l.with("u1", |e| (e.report_token.clone(), e.latest.is_some())), Some((None, false)));
        // A stale cache still says Running: the queue (peek, which keeps the entry) and the
        // decision start from what we wrote.
        let peeked = l.peek_status("u1", &status(Phase::Running)).map(|s| s.phase);
        assert_eq!(peeked, Some(Phase::Succeeded), "a slot freed a moment ago counts as free");
        assert_eq!(l.last_status("u1", status(Phase::Running)).phase, Phase::Succeeded);
        // The cache caught up: the entry goes.
        assert_eq!(l.last_status("u1", status(Phase::Succeeded)).phase, Phase::Succeeded);
        assert!(l.is_empty());
    }

    #[test]
    fn a_written_status_stands_until_the_cache_shows_it() {
        let l = Ledger::default();
        let queued = status(Phase::Queued);
        let mut running = status(Phase::Running);
        running.message = Some("the agent is working".into());
        l.wrote("u1", &running);
        assert_eq!(l.last_status("u1", queued.clone()), running, "the stale cache is not decided from");
        assert_eq!(l.last_status("u1", running.clone()), running);
        assert_eq!(l.with("u1", |e| e.written.clone()), None, "caught up: forgotten (and nothing else was kept)");
        assert_eq!(l.last_status("u1", queued.clone()), queued, "from now on the cache is the truth");
    }

    #[test]
    fn a_run_that_ends_without_a_final_status_leaves_nothing() {
        let l = Ledger::default();
        l.update("u1", |e| e.report_token = Some("t".into()));
        l.end_run("u1");
        assert!(l.is_empty());
        assert_eq!(l.with("u1", |_| ()), None, "with never creates");
    }

    #[test]
    fn entries_are_per_uid_not_per_name() {
        let l = Ledger::default();
        l.wrote("old-uid", &status(Phase::Failed));
        // Same name, new object: nothing of the old one applies.
        assert_eq!(l.last_status("new-uid", status(Phase::Pending)).phase, Phase::Pending);
    }

    #[test]
    fn a_forgotten_local_run_takes_its_private_files_with_it() {
        let l = Ledger::default();
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(run_dir.join("secrets")).unwrap();
        std::fs::write(run_dir.join("secrets/token"), "x").unwrap();
        l.update("u1", |e| e.local = Some(Box::new(LocalRun { pid: None, done: None, dir: run_dir.clone() })));
        l.end_run("u1");
        assert!(!run_dir.exists());
    }
}
