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
    let res = super::http_client()
        .post(&target.url)
        .bearer_auth(&target.token)
        .json(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
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

/// Handle for one execution's log and progress writes.
pub struct Recorder {
    tx: mpsc::UnboundedSender<Record>,
    task: JoinHandle<()>,
    redactor: Redactor,
}

impl Recorder {
    /// Starts the writer task for execution `id`.
    pub fn start(store: Store, id: String, redactor: Redactor, report: Option<ReportTarget>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
        let task = tokio::spawn(async move {
            let mut seq: i64 = 0;
            let mut last_report: Option<Instant> = None;
            let mut unsent: Option<Progress> = None;
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
