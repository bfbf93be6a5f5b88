//! Writes logs and live progress to the store off the hot path: the agent's stream is read
//! without waiting on SQLite; a task batches what piled up into one transaction.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::secrets::Redactor;
use crate::store::{Progress, Store, now};

enum Record {
    Log {
        source: String,
        line: String,
        at: String,
    },
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
    pub fn start(store: Store, id: String, redactor: Redactor) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
        let task = tokio::spawn(async move {
            let mut seq: i64 = 0;
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
                if let Some(p) = progress
                    && let Err(e) = store.record_progress(&id, &p).await
                {
                    tracing::warn!(execution = %id, error = %e, "cannot store progress");
                }
            }
        });
        Self { tx, task, redactor }
    }

    /// Queues a log line (secrets masked).
    pub fn log(&self, source: &str, line: &str) {
        let line = self.redactor.redact(line);
        let _ = self.tx.send(Record::Log {
            source: source.to_string(),
            line,
            at: now(),
        });
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
