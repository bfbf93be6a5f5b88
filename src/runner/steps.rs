//! The pipeline as a runner pod runs it: each step is `agentops step <name>` in a container of
//! its own, mounting only what that step needs, and the steps hand over through files.
//!
//! | step      | kind of container | holds                                    | writes            |
//! |-----------|-------------------|------------------------------------------|-------------------|
//! | `clone`   | init              | the git credential (one key)             | private, stream   |
//! | `agent`   | init              | the model gateway's token for this run   | stream, workspace |
//! | `publish` | init              | the git credential, the report token     | private           |
//! | `finish`  | main              | nothing                                  | termination log   |
//!
//! `private` is a volume the agent's container does not mount: what the clone and publish steps
//! trust (the base commit, the outcome, the git result) lives there. `stream` is the agent's:
//! its stream-json lines and its own account of how it ended, read back as the agent's word
//! only (turns, tools, result text). Tokens and cost in the status are the controller's
//! gateway's figures, not these. Post and error hooks run in `finish`, where no credential is
//! mounted, since they run commands over a workspace the agent wrote.
//!
//! Every step exits 0 when it ran, whatever the execution's outcome: a failed clone is handed
//! on (the agent and publish steps skip, finish runs the error hooks and writes the summary).
//! A step exits non-zero only when it could not run at all; its termination message says why.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Base, Outcome, Run, RunError, RunOptions, Summary, Workspace, post_diff, post_logs, secrets};
use crate::agent::Tally;
use crate::api::{GitResult, Phase, Reason, Resolved};
use crate::store::{NewExecution, Store, now};

pub use crate::api::contract::{AGENT_DB, Step};

/// Where the steps hand over.
#[derive(Debug, Clone)]
pub struct StepDirs {
    /// Not mounted in the agent's container.
    pub private: PathBuf,
    /// The agent's: written by the agent step, read by the steps after it.
    pub stream: PathBuf,
}

/// What a step leaves in `private` for the steps after it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Handoff {
    id: String,
    start_time: String,
    base: Option<Base>,
    /// Set by the step that ended the execution (a failure, or publish when it is done).
    outcome: Option<Outcome>,
    git: GitResult,
    unpushed: bool,
}

/// What the clone step tells the agent's container: where and since when, and whether to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Begin {
    id: String,
    start_time: String,
    go: bool,
}

/// The agent step's own account of how it ended (None: the work is ready to publish).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentEnd {
    outcome: Option<Outcome>,
}

const HANDOFF: &str = "handoff.json";
const BEGIN: &str = "begin.json";
const AGENT_END: &str = "agent.json";
const STREAM: &str = "agent.jsonl";
const DIFF: &str = "diff.patch";
/// Longest diff sent to the controller (marked when cut).
pub const DIFF_LIMIT: usize = 1024 * 1024;
/// Largest hand-over file read (the agent writes `stream`).
const READ_LIMIT: u64 = 1024 * 1024;

/// What a step ended with.
#[derive(Debug)]
pub enum StepEnd {
    /// Hand over to the next step.
    Next,
    /// Hand over, with the publish step's word on the execution for its own termination
    /// message (a file no later step can write: the controller believes it over `finish`).
    Published(Box<Summary>),
    /// The execution's summary (the finish step).
    Done(Box<Summary>),
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    use std::io::Read;
    let mut text = Vec::new();
    open_regular(path)?.take(READ_LIMIT).read_to_end(&mut text)?;
    serde_json::from_slice(&text).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

/// Opens a hand-over file for reading only if it is a regular file: the `stream` directory is
/// the agent's, and a FIFO it planted there would block an open forever (opened without
/// blocking, then checked), a symlink would lead elsewhere.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(format!("{} is not a regular file", path.display())));
    }
    Ok(f)
}

/// An instant as far in the past as `start_time` (RFC 3339) is.
fn instant_of(start_time: &str) -> Instant {
    let elapsed = chrono::DateTime::parse_from_rfc3339(start_time)
        .ok()
        .and_then(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).to_std().ok())
        .unwrap_or_default();
    Instant::now().checked_sub(elapsed).unwrap_or_else(Instant::now)
}

/// The agent's tally, read back from its stream file (bounded: lines past the limits count as
/// malformed, as when read live).
fn tally_of(stream: &Path) -> Tally {
    use std::io::BufRead;
    let mut tally = Tally::default();
    if let Ok(f) = open_regular(&stream.join(STREAM)) {
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            tally.push_line(&line);
        }
    }
    tally
}

/// A step could not run at all (bad hand-over, store); the message goes to the termination log.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{0}")]
    Handoff(String),
}

/// Runs one step of the execution. `r` is resolved from the manifest; its API key reference is
/// ignored (a pod's agent reaches the model through the controller's gateway, `opts.gateway`).
pub async fn run_step(
    step: Step,
    store: &Store,
    opts: &RunOptions,
    r: &Resolved,
    dirs: &StepDirs,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
    cancel: CancellationToken,
) -> Result<StepEnd, StepError> {
    let mut r = r.clone();
    r.api_key = None;
    if opts.git_relay.is_some() {
        // The relay holds the credential; this step has only its own token.
        r.credentials = None;
    }
    let r = &r;
    let relay_secrets = |mut s: super::Secrets| {
        if let Some(g) = &opts.git_relay {
            s.git = Some(crate::git::GitCredentials { username: "agentops".into(), token: g.token.clone() });
        }
        s
    };
    let handoff_path = dirs.private.join(HANDOFF);
    let lost = |what: &str, e: std::io::Error| StepError::Handoff(format!("{what}: {e}"));
    let read_handoff = || -> Result<Handoff, StepError> {
        read_json(&handoff_path).map_err(|e| lost("the clone step left no hand-over", e))
    };
    let write_handoff = |h: &Handoff| write_json(&handoff_path, h).map_err(|e| lost("cannot write the hand-over", e));
    match step {
        Step::Clone => {
            let secrets = relay_secrets(secrets::load(r, &opts.secrets_dir, |_| None).map_err(RunError::from)?);
            let redactor = super::Redactor::new(&secrets);
            let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
            let start_time = now();
            store.create_execution(&NewExecution::new(&id, r)).await.map_err(RunError::from)?;
            store.mark_running(&id, &start_time).await.map_err(RunError::from)?;
            let (mut run, watcher) =
                resume(step, store, opts, r, cancel, secrets, redactor, id.clone(), start_time.clone());
            run.private = Some(dirs.private.clone());
            run.say(&format!("▶ {} ({}): {}", r.name, id, r.repo_url));
            let cloned = run.clone_part(store).await;
            watcher.abort();
            let go = cloned.is_ok();
            let h = Handoff {
                id: id.clone(),
                start_time: start_time.clone(),
                base: cloned.as_ref().ok().cloned(),
                outcome: cloned.err(),
                git: run.git.clone(),
                unpushed: false,
            };
            run.rec.finish().await;
            write_handoff(&h)?;
            write_json(&dirs.stream.join(BEGIN), &Begin { id, start_time, go })
                .map_err(|e| lost("cannot write the agent's start", e))?;
            Ok(StepEnd::Next)
        }
        Step::Agent => {
            let begin: Begin =
                read_json(&dirs.stream.join(BEGIN)).map_err(|e| lost("the clone step left no start", e))?;
            if !begin.go {
                return Ok(StepEnd::Next);
            }
            let mut redactor = super::Redactor::new(&Default::default());
            if let Some(g) = &opts.gateway {
                let egress = opts.egress.iter().map(|e| e.token.clone());
                redactor = super::Redactor::from_values(std::iter::once(g.token.clone()).chain(egress));
            }
            store.ensure_execution(&NewExecution::new(&begin.id, r)).await.map_err(RunError::from)?;
            let (mut run, watcher) = resume(
                step,
                store,
                opts,
                r,
                cancel,
                Default::default(),
                redactor,
                begin.id.clone(),
                begin.start_time.clone(),
            );
            run.ws = Some(Workspace::at(&opts.workspace_root, &begin.id));
            let mut out = std::fs::File::create(dirs.stream.join(STREAM))
                .map_err(|e| lost("cannot write the agent's stream", e))?;
            let outcome = run.agent_part(env, Some(&mut out)).await;
            watcher.abort();
            run.rec.finish().await;
            write_json(&dirs.stream.join(AGENT_END), &AgentEnd { outcome })
                .map_err(|e| lost("cannot write the agent's end", e))?;
            Ok(StepEnd::Next)
        }
        Step::Publish => {
            let mut h = read_handoff()?;
            if let Some(o) = &h.outcome {
                return Ok(post_verdict(opts, o, &h.git, None, &Tally::default()).await);
            }
            // The agent's own word on how it ended; when it never wrote one, it did not run.
            let agent: AgentEnd = read_json(&dirs.stream.join(AGENT_END)).unwrap_or(AgentEnd {
                outcome: Some(Outcome::failed(Reason::AgentCrashed, "the agent step ended without an account")),
            });
            if let Some(o) = agent.outcome {
                h.outcome = Some(o);
                write_handoff(&h)?;
                let o = h.outcome.clone().unwrap_or_else(|| Outcome::failed(Reason::InternalError, "no outcome"));
                return Ok(post_verdict(opts, &o, &h.git, None, &tally_of(&dirs.stream)).await);
            }
            let secrets = relay_secrets(secrets::load(r, &opts.secrets_dir, |_| None).map_err(RunError::from)?);
            let redactor = super::Redactor::new(&secrets);
            let (mut run, watcher) =
                resume(step, store, opts, r, cancel, secrets, redactor, h.id.clone(), h.start_time.clone());
            run.ws = Some(Workspace::at(&opts.workspace_root, &h.id));
            run.private = Some(dirs.private.clone());
            run.git = h.git.clone();
            let outcome = match &h.base {
                Some(base) => run.publish_part(base).await,
                None => Outcome::failed(Reason::InternalError, "the clone step left no base commit"),
            };
            watcher.abort();
            h.git = run.git.clone();
            h.unpushed = run.unpushed;
            let outcome = Outcome { message: run.redactor.redact(&outcome.message), ..outcome };
            h.outcome = Some(outcome.clone());
            if let Some(diff) = &run.diff {
                std::fs::write(dirs.private.join(DIFF), diff).map_err(|e| lost("cannot keep the diff", e))?;
            }
            run.rec.finish().await;
            write_handoff(&h)?;
            // The controller keeps the record of cluster runs: what git did (from here, before any
            // hook of `finish` runs over the agent's workspace), every step's log lines, the diff.
            // The structured output too: the finish step's termination message has no room for
            // 16 KiB, and the finish container holds no report token.
            let tally = tally_of(&dirs.stream);
            let output = r.output_schema.as_ref().and_then(|schema| {
                let given = tally.result.as_ref().and_then(|res| res.structured_output.as_ref());
                crate::api::output::judge_output(schema, given).ok()
            });
            let handed = post_verdict(opts, &outcome, &h.git, output, &tally).await;
            if let Some(target) = &opts.report {
                forward_logs(target, store, &h.id, &dirs.stream.join(AGENT_DB)).await;
                if let Some(diff) = &run.diff {
                    post_diff(target, &crate::api::report::truncate(diff, DIFF_LIMIT)).await;
                }
            }
            Ok(handed)
        }
        Step::Finish => {
            let h = read_handoff()?;
            let outcome = h
                .outcome
                .clone()
                .unwrap_or_else(|| Outcome::failed(Reason::InternalError, "the publish step left no outcome"));
            let (mut run, watcher) = resume(
                step,
                store,
                opts,
                r,
                cancel,
                Default::default(),
                super::Redactor::new(&Default::default()),
                h.id.clone(),
                h.start_time.clone(),
            );
            let ws = Workspace::at(&opts.workspace_root, &h.id);
            run.ws = ws.repo.exists().then_some(ws);
            run.git = h.git.clone();
            run.unpushed = h.unpushed;
            run.tally = tally_of(&dirs.stream);
            run.diff = std::fs::read_to_string(dirs.private.join(DIFF)).ok();
            let summary = run.end(outcome).await;
            watcher.abort();
            let Run { rec, diff, .. } = run;
            rec.finish().await;
            let error = (summary.phase != Phase::Succeeded).then(|| summary.message.clone().unwrap_or_default());
            store.ensure_execution(&NewExecution::new(&h.id, r)).await.map_err(RunError::from)?;
            store.finish_execution(&summary, error.as_deref(), diff.as_deref()).await.map_err(RunError::from)?;
            Ok(StepEnd::Done(Box::new(summary)))
        }
    }
}

/// The publish step's report to the controller: how the execution ended up to and including
/// the push, and what git did, sent before any hook of `finish` runs over the agent's
/// workspace. The controller believes the finish step only where it agrees with this
/// (`controller::verdict`), so it is tried for up to half a minute.
async fn post_verdict(
    opts: &RunOptions,
    o: &Outcome,
    git: &GitResult,
    output: Option<serde_json::Value>,
    agent: &Tally,
) -> StepEnd {
    let said = Summary {
        phase: o.phase,
        reason: Some(o.reason.clone()),
        message: Some(crate::api::report::truncate(&o.message, 1024)).filter(|m| !m.is_empty()),
        git: git.clone(),
        ..Default::default()
    };
    let handed = StepEnd::Published(Box::new(said.clone()));
    let Some(target) = &opts.report else { return handed };
    // The report has room for what the finish step's termination message may have to cut: the
    // structured output, the agent's final text, every tool's count (the agent's word).
    let result = agent.result.as_ref().and_then(|r| r.text.clone()).or_else(|| agent.last_text.clone());
    let said = Summary {
        output,
        result: result.map(|r| crate::api::report::truncate(&r, super::RESULT_LIMIT)),
        tool_calls: agent.tool_calls.bounded(64),
        num_turns: agent.num_turns(),
        session_id: agent.session_id.clone(),
        ..said
    };
    let Ok(v) = serde_json::to_value(&said) else { return handed };
    let mut delay = std::time::Duration::from_millis(500);
    for _ in 0..6 {
        if super::post_report(target, &v).await {
            return handed;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(8));
    }
    tracing::warn!("the controller did not take the publish step's report; its termination message says the same");
    handed
}

/// The run of one step: same id and start as the first step's, its own log line numbers.
#[allow(clippy::too_many_arguments)]
fn resume<'a>(
    step: Step,
    store: &Store,
    opts: &'a RunOptions,
    r: &'a Resolved,
    cancel: CancellationToken,
    secrets: super::Secrets,
    redactor: super::Redactor,
    id: String,
    start_time: String,
) -> (Run<'a>, tokio::task::JoinHandle<()>) {
    let started = instant_of(&start_time);
    Run::new_at(store, opts, r, cancel, secrets, redactor, id, started, start_time, step.first_log_seq())
}

/// Sends the log lines of the steps so far (this store's, and the agent's own store) to the
/// controller, in batches.
async fn forward_logs(target: &super::ReportTarget, store: &Store, id: &str, agent_db: &Path) {
    let mut lines: Vec<(i64, String, String, String)> = Vec::new();
    let mut add = |rows: Vec<crate::store::LogLine>| {
        lines.extend(rows.into_iter().map(|l| (l.seq, l.source, l.line, l.at)));
    };
    if let Ok(rows) = store.logs(id).await {
        add(rows);
    }
    if agent_db.exists()
        && std::fs::symlink_metadata(agent_db).is_ok_and(|m| m.is_file())
        && let Ok(agent) = Store::open_read_only(agent_db).await
        && let Ok(rows) = agent.logs(id).await
    {
        // Only the agent step's range: its store is the agent's to write.
        add(rows.into_iter().filter(|l| (1_000_000..2_000_000).contains(&l.seq)).collect());
    }
    lines.sort_by_key(|l| l.0);
    // The controller keeps an execution's first and last lines only (`Store::append_logs`): the
    // rest is not sent (the agent's own store, where Landlock is missing, may hold a million).
    let (head, tail) = (crate::store::LOG_HEAD_LINES as usize, crate::store::LOG_TAIL_LINES as usize);
    if lines.len() > head + tail {
        lines.drain(head..lines.len() - tail);
    }
    for batch in lines.chunks(200) {
        if !post_logs(target, batch).await {
            break;
        }
    }
}

impl Workspace {
    /// The workspace of execution `id` under `root`, as an earlier step created it.
    pub fn at(root: &Path, id: &str) -> Self {
        let root = root.join(format!("agentops-{id}"));
        Self { id: id.to_string(), repo: root.join("repo"), home: root.join("home"), root }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_planted_where_a_hand_over_is_read_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join(AGENT_END);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let err = read_json::<AgentEnd>(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // The agent's stream as a FIFO: read as empty, at once.
        std::fs::remove_file(&fifo).unwrap();
        nix::unistd::mkfifo(&dir.path().join(STREAM), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(tally_of(dir.path()).tool_calls.total, 0);
        // A symlink to a file elsewhere is not followed.
        std::fs::write(dir.path().join("elsewhere.json"), r#"{"outcome":null}"#).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere.json"), dir.path().join(BEGIN)).unwrap();
        assert!(read_json::<Begin>(&dir.path().join(BEGIN)).is_err());
    }
}
