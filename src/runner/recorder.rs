//! Writes logs and live progress to the store off the hot path: the agent's stream is read
//! without waiting on SQLite; a task batches what piled up into one transaction.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use std::time::{Duration, Instant};

use super::secrets::Redactor;
use crate::store::{Progress, Store, now};

/// The controller's endpoint for one execution's reports, and the token that proves the
/// sender is that execution's runner.
#[derive(Clone)]
pub struct ReportTarget {
    pub url: String,
    pub token: String,
}

impl ReportTarget {
    /// A sibling endpoint of the report URL (`.../report` → `.../logs`, `.../diff`).
    pub fn endpoint(&self, kind: &str) -> String {
        match self.url.strip_suffix("/report") {
            Some(base) => format!("{base}/{kind}"),
            None => format!("{}/{kind}", self.url.trim_end_matches('/')),
        }
    }
}

/// Log lines sent to the controller in one request at most (and one line at most this long).
const LOG_BATCH: usize = 200;
const LOG_LINE_LIMIT: usize = 4096;

/// Sends log lines to the controller's store; false when it could not (they are in the
/// runner's own store still).
pub async fn post_logs(target: &ReportTarget, lines: &[(i64, String, String, String)]) -> bool {
    let body: Vec<serde_json::Value> = lines
        .iter()
        .map(|(seq, source, line, at)| {
            serde_json::json!({"seq": seq, "source": source, "line": crate::api::report::truncate(line, LOG_LINE_LIMIT), "at": at})
        })
        .collect();
    post_to(&target.endpoint("logs"), &target.token, &serde_json::Value::Array(body)).await
}

/// Sends the diff of the work (bounded by the caller) to the controller's store.
pub async fn post_diff(target: &ReportTarget, diff: &str) -> bool {
    post_to(&target.endpoint("diff"), &target.token, &serde_json::json!({"diff": diff})).await
}

impl std::fmt::Debug for ReportTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportTarget").field("url", &self.url).field("token", &"***").finish()
    }
}

/// Live progress reaches the controller at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Posts a report (progress or the final summary) to the controller. Returns whether it was
/// accepted; failures are logged, never fatal: the termination message carries the final one.
pub async fn post_report(target: &ReportTarget, body: &serde_json::Value) -> bool {
    post_to(&target.url, &target.token, body).await
}

async fn post_to(url: &str, token: &str, body: &serde_json::Value) -> bool {
    let res = super::http_client().post(url).bearer_auth(token).json(body).timeout(Duration::from_secs(5)).send().await;
    match res {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            tracing::warn!(status = r.status().as_u16(), "the controller refused a progress report");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot send a progress report");
            false
        }
    }
}

fn progress_report(p: &Progress) -> serde_json::Value {
    serde_json::json!({
        "phase": "Running",
        "usage": p.usage,
        "tokensUsed": p.usage.total(),
        "costUsd": p.cost_usd,
        "numTurns": p.num_turns,
        "toolCalls": p.tool_calls,
        "sessionId": p.session_id,
    })
}

enum Record {
    Log { source: String, line: String, at: String },
    Progress(Progress),
}

async fn flush_logs(target: &ReportTarget, outbox: &mut Vec<(i64, String, String, String)>) {
    while !outbox.is_empty() {
        let n = outbox.len().min(LOG_BATCH);
        if !post_logs(target, &outbox[..n]).await {
            // Not reachable now: keep the lines for the next attempt (bounded, oldest dropped).
            if outbox.len() > 10 * LOG_BATCH {
                outbox.drain(..outbox.len() - 10 * LOG_BATCH);
            }
            return;
        }
        outbox.drain(..n);
    }
}

/// Handle for one execution's log and progress writes.
pub struct Recorder {
    tx: mpsc::UnboundedSender<Record>,
    task: JoinHandle<()>,
    redactor: Redactor,
}

impl Recorder {
    /// Starts the writer task for execution `id`.
    pub fn start(store: Store, id: String, redactor: Redactor, report: Option<ReportTarget>) -> Self {
        Self::start_at(store, id, redactor, report, 0)
    }

    /// The same, numbering log lines after `first_seq`.
    pub fn start_at(
        store: Store,
        id: String,
        redactor: Redactor,
        report: Option<ReportTarget>,
        first_seq: i64,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
        let task = tokio::spawn(async move {
            let mut seq: i64 = first_seq;
            let mut last_report: Option<Instant> = None;
            let mut unsent: Option<Progress> = None;
            // Log lines not yet at the controller (cluster runs keep their record there).
            let mut outbox: Vec<(i64, String, String, String)> = Vec::new();
            let mut last_logs: Option<Instant> = None;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut logs = Vec::new();
                let mut progress = None;
                for r in batch {
                    match r {
                        Record::Log { source, line, at } => {
                            seq += 1;
                            logs.push((seq, source, line, at));
                        }
                        Record::Progress(p) => progress = Some(p),
                    }
                }
                if let Err(e) = store.append_logs(&id, &logs).await {
                    tracing::warn!(execution = %id, error = %e, "cannot store log lines");
                }
                if report.is_some() {
                    outbox.extend(logs);
                }
                if let Some(p) = progress {
                    if let Err(e) = store.record_progress(&id, &p).await {
                        tracing::warn!(execution = %id, error = %e, "cannot store progress");
                    }
                    unsent = Some(p);
                }
                if let (Some(target), Some(p)) = (&report, &unsent)
                    && last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY)
                {
                    post_report(target, &progress_report(p)).await;
                    last_report = Some(Instant::now());
                    unsent = None;
                }
                if let Some(target) = &report
                    && (outbox.len() >= LOG_BATCH || last_logs.is_none_or(|t| t.elapsed() >= REPORT_EVERY))
                {
                    flush_logs(target, &mut outbox).await;
                    last_logs = Some(Instant::now());
                }
            }
            // The end: whatever is left.
            if let Some(target) = &report {
                flush_logs(target, &mut outbox).await;
            }
        });
        Self { tx, task, redactor }
    }

    /// Queues a log line (secrets masked).
    pub fn log(&self, source: &str, line: &str) {
        let line = self.redactor.redact(line);
        let _ = self.tx.send(Record::Log { source: source.to_string(), line, at: now() });
    }

    /// Queues the latest totals (only the newest pending one is written).
    pub fn progress(&self, p: Progress) {
        let _ = self.tx.send(Record::Progress(p));
    }

    /// Waits until everything queued is written.
    pub async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}
