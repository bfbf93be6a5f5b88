//! Execution records: created, updated with live usage while the agent runs, finished once.

use crate::api::Summary;
use crate::api::{Phase, ToolCalls, Usage};

use super::owner::Owner;
use super::{Store, StoreError, now};

/// What is known when an execution starts.
#[derive(Debug, Clone)]
pub struct NewExecution<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub prompt: &'a str,
    pub repo_url: &'a str,
    pub branch: &'a str,
    pub model: Option<&'a str>,
    pub worker: Option<&'a str>,
    pub work_item: Option<&'a str>,
    /// The agent's configuration it runs with (names, counts, hash).
    pub agent_config: Option<crate::api::AgentConfigRecord>,
}

impl<'a> NewExecution<'a> {
    /// The record of an execution with these settings.
    pub fn new(id: &'a str, r: &'a crate::api::Resolved) -> Self {
        Self {
            id,
            name: &r.name,
            namespace: &r.namespace,
            prompt: &r.prompt,
            repo_url: &r.repo_url,
            branch: &r.branch,
            model: r.model.as_deref(),
            worker: r.worker.as_deref(),
            work_item: r.work_item.as_deref(),
            agent_config: Some(r.agent_config.record()),
        }
    }
}

/// Running totals written while the agent works.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub usage: Usage,
    pub cost_usd: f64,
    pub num_turns: u64,
    pub tool_calls: ToolCalls,
    pub session_id: Option<String>,
}

/// Lines an execution keeps from its start.
pub const LOG_HEAD_LINES: i64 = 2000;
/// Lines an execution keeps from its end.
pub const LOG_TAIL_LINES: i64 = 3000;
/// Longest log line kept (longer ones are cut and marked).
pub const MAX_LOG_LINE: usize = 16 * 1024;
/// The source of the line that says how many lines were cut.
pub const CUT_SOURCE: &str = "agentops:cut";

/// One log line.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct LogLine {
    pub seq: i64,
    pub source: String,
    pub line: String,
    pub at: String,
}

/// One row of `agent_executions`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ExecutionRow {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub workspace_id: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub error_message: Option<String>,
    pub prompt: String,
    pub repo_url: String,
    pub branch: Option<String>,
    pub model: Option<String>,
    pub worker: Option<String>,
    pub work_item: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub updated_at: String,
    pub duration_ms: Option<i64>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_input_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub tokens_used: i64,
    pub cost_usd: f64,
    pub num_turns: i64,
    pub tool_calls: i64,
    pub tool_calls_by_tool: String,
    pub session_id: Option<String>,
    pub result: Option<String>,
    pub git_commit: Option<String>,
    pub pushed: bool,
    pub changed_files: i64,
    pub insertions: i64,
    pub deletions: i64,
    pub diff: Option<String>,
    pub output_json: Option<String>,
    pub pull_request_url: Option<String>,
    pub pull_request_number: Option<i64>,
    pub pull_request_provider: Option<String>,
    pub pull_request_state: Option<String>,
    pub structured_output: Option<String>,
    pub agent_config_hash: Option<String>,
    pub agent_config: Option<String>,
}

impl ExecutionRow {
    /// The run report of this row, in the one JSON shape: the report written when the run
    /// finished, else one built from the live columns (a run still going, or interrupted).
    pub fn summary(&self) -> Summary {
        let mut s = self.report();
        // The record of a cluster execution is built from its status, which keeps only the hash.
        if s.agent_config.is_none() {
            s.agent_config = self.agent_config.as_deref().and_then(|c| serde_json::from_str(c).ok());
        }
        s
    }

    fn report(&self) -> Summary {
        if let Some(s) = self.output_json.as_deref().and_then(|j| serde_json::from_str::<Summary>(j).ok()) {
            return s;
        }
        let u = |n: i64| u64::try_from(n).unwrap_or_default();
        Summary {
            id: self.id.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            phase: serde_json::from_value(serde_json::Value::String(self.status.clone())).unwrap_or_default(),
            reason: self.reason.as_deref().map(crate::api::Reason::from),
            message: self.message.clone(),
            start_time: self.started_at.clone(),
            completion_time: self.completed_at.clone(),
            duration_ms: self.duration_ms.map(u).unwrap_or_default(),
            tokens_used: u(self.tokens_used),
            usage: Usage {
                input_tokens: u(self.input_tokens),
                output_tokens: u(self.output_tokens),
                cache_read_input_tokens: u(self.cache_read_input_tokens),
                cache_creation_input_tokens: u(self.cache_creation_input_tokens),
            },
            cost_usd: self.cost_usd,
            num_turns: u(self.num_turns),
            tool_calls: ToolCalls {
                total: u(self.tool_calls),
                by_tool: serde_json::from_str(&self.tool_calls_by_tool).unwrap_or_default(),
            },
            session_id: self.session_id.clone(),
            result: self.result.clone(),
            output: self.structured_output.as_deref().and_then(|o| serde_json::from_str(o).ok()),
            model: self.model.clone(),
            api_retries: 0,
            git: crate::api::GitResult {
                branch: self.branch.clone(),
                commit: self.git_commit.clone(),
                pushed: self.pushed,
                changed_files: u(self.changed_files),
                insertions: u(self.insertions),
                deletions: u(self.deletions),
                pull_request: match (&self.pull_request_url, self.pull_request_number) {
                    (Some(url), Some(n)) => Some(crate::api::PullRequestResult {
                        url: url.clone(),
                        number: u(n),
                        provider: self.pull_request_provider.clone().unwrap_or_default(),
                        state: self.pull_request_state.clone().unwrap_or_default(),
                    }),
                    _ => None,
                },
                pull_request_url: self.pull_request_url.clone(),
                ..Default::default()
            },
            workspace: None,
            agent_config: None,
            permission_denials: 0,
            mcp_requests: Default::default(),
            egress: None,
        }
    }
}

fn i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Records a new execution in phase Pending.
    pub async fn create_execution(&self, e: &NewExecution<'_>) -> Result<(), StoreError> {
        self.insert_execution(e, "INSERT", false).await
    }

    /// Records an AgentExecution of the cluster once (the controller's record; idempotent).
    pub async fn ensure_cluster_execution(&self, e: &NewExecution<'_>) -> Result<(), StoreError> {
        self.insert_execution(e, "INSERT OR IGNORE", true).await
    }

    async fn insert_execution(
        &self,
        e: &NewExecution<'_>,
        verb: &'static str,
        cluster: bool,
    ) -> Result<(), StoreError> {
        let at = now();
        let sql = format!(
            "{verb} INTO agent_executions (id, name, namespace, status, prompt, repo_url, branch, model, worker, work_item, created_at, updated_at, cluster, agent_config_hash, agent_config)
             VALUES (?, ?, ?, 'Pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        );
        // `verb` is one of two literals above, never input.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(e.id)
            .bind(e.name)
            .bind(e.namespace)
            .bind(e.prompt)
            .bind(e.repo_url)
            .bind(e.branch)
            .bind(e.model)
            .bind(e.worker)
            .bind(e.work_item)
            .bind(&at)
            .bind(&at)
            .bind(cluster)
            .bind(e.agent_config.as_ref().map(|c| c.hash.clone()))
            .bind(e.agent_config.as_ref().and_then(|c| serde_json::to_string(c).ok()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks the execution Running, held by this process (see `end_abandoned`).
    pub async fn mark_running(&self, id: &str, started_at: &str) -> Result<(), StoreError> {
        let me = Owner::current();
        sqlx::query(
            "UPDATE agent_executions SET status = 'Running', started_at = ?, updated_at = ?, owner_boot_id = ?,
               owner_pid_ns = ?, owner_pid = ?, owner_start = ? WHERE id = ?",
        )
        .bind(started_at)
        .bind(now())
        .bind(me.as_ref().map(|o| o.boot_id.clone()))
        .bind(me.as_ref().map(|o| o.pid_ns.clone()))
        .bind(me.as_ref().map(|o| o.pid))
        .bind(me.as_ref().map(|o| o.start))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends the executions left Running by a process that is gone (SIGKILL, out of memory, the
    /// machine restarted): Failed, reason `RunnerLost`, with what was recorded until then (usage,
    /// logs) and the report built from it; their workspace is kept, marked `error`. A row whose
    /// process still runs, or runs where this process cannot see (another PID namespace), or that
    /// no process holds (the controller's records, an execution between a pod's steps), is left
    /// as it is. Returns how many were ended.
    pub async fn end_abandoned(&self) -> Result<u64, StoreError> {
        type Held = (String, String, String, i64, i64, Option<String>);
        let held: Vec<Held> = sqlx::query_as(
            "SELECT id, owner_boot_id, owner_pid_ns, owner_pid, owner_start, started_at FROM agent_executions
             WHERE status = 'Running' AND owner_pid IS NOT NULL AND owner_start IS NOT NULL
               AND owner_boot_id IS NOT NULL AND owner_pid_ns IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut ended = 0;
        for (id, boot_id, pid_ns, pid, start, started_at) in held {
            if !(Owner { boot_id, pid_ns, pid, start }).is_gone() {
                continue;
            }
            let message = format!(
                "agentops stopped before the execution ended: its process ({pid}) is gone (killed, out of memory, or the machine restarted); the usage recorded until then is kept"
            );
            let duration_ms = started_at
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds().max(0));
            let at = now();
            let done = sqlx::query(
                "UPDATE agent_executions SET status = 'Failed', reason = 'RunnerLost', message = ?, error_message = ?,
                   completed_at = ?, duration_ms = COALESCE(?, duration_ms), updated_at = ?, owner_boot_id = NULL,
                   owner_pid_ns = NULL, owner_pid = NULL, owner_start = NULL
                 WHERE id = ? AND status = 'Running' AND owner_pid = ? AND owner_start = ?",
            )
            .bind(&message)
            .bind(&message)
            .bind(&at)
            .bind(duration_ms)
            .bind(&at)
            .bind(&id)
            .bind(pid)
            .bind(start)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 0 {
                // Another process ended it first.
                continue;
            }
            ended += 1;
            // The report, in the one shape a finished run has (what `executions show` prints).
            let row: ExecutionRow =
                sqlx::query_as("SELECT * FROM agent_executions WHERE id = ?").bind(&id).fetch_one(&self.pool).await?;
            sqlx::query("UPDATE agent_executions SET output_json = ? WHERE id = ? AND output_json IS NULL")
                .bind(serde_json::to_string(&row.summary()).ok())
                .bind(&id)
                .execute(&self.pool)
                .await?;
            sqlx::query(
                "UPDATE workspaces SET status = 'error', completed_at = ? WHERE execution_id = ? AND status = 'active'",
            )
            .bind(&at)
            .bind(&id)
            .execute(&self.pool)
            .await?;
        }
        Ok(ended)
    }

    /// Lets go of the executions this process holds Running: no process holds them from then
    /// on, and none is ended by `end_abandoned` (a pod's steps hand one execution from process
    /// to process; the controller watches the pod).
    pub async fn release(&self) -> Result<(), StoreError> {
        let Some(me) = Owner::current() else { return Ok(()) };
        sqlx::query(
            "UPDATE agent_executions SET owner_boot_id = NULL, owner_pid_ns = NULL, owner_pid = NULL, owner_start = NULL
             WHERE status = 'Running' AND owner_boot_id = ? AND owner_pid_ns = ? AND owner_pid = ? AND owner_start = ?",
        )
        .bind(&me.boot_id)
        .bind(&me.pid_ns)
        .bind(me.pid)
        .bind(me.start)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes the live totals.
    pub async fn record_progress(&self, id: &str, p: &Progress) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agent_executions SET input_tokens = ?, output_tokens = ?, cache_read_input_tokens = ?,
               cache_creation_input_tokens = ?, tokens_used = ?, cost_usd = ?, num_turns = ?, tool_calls = ?,
               tool_calls_by_tool = ?, session_id = COALESCE(?, session_id), updated_at = ? WHERE id = ?",
        )
        .bind(i(p.usage.input_tokens))
        .bind(i(p.usage.output_tokens))
        .bind(i(p.usage.cache_read_input_tokens))
        .bind(i(p.usage.cache_creation_input_tokens))
        .bind(i(p.usage.total()))
        .bind(p.cost_usd)
        .bind(i(p.num_turns))
        .bind(i(p.tool_calls.total))
        .bind(serde_json::to_string(&p.tool_calls.by_tool).unwrap_or_else(|_| "{}".into()))
        .bind(&p.session_id)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends log lines in one transaction, keeping at most `LOG_HEAD_LINES` first and
    /// `LOG_TAIL_LINES` last lines of an execution (each at most `MAX_LOG_LINE` bytes): lines
    /// between them are dropped as new ones arrive, and one line where they were says how many.
    /// Whatever an agent prints, its record stays bounded.
    pub async fn append_logs(&self, id: &str, lines: &[(i64, String, String, String)]) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (seq, source, line, at) in lines {
            // `agentops:` sources are the store's own (the cut marker): a line that comes with one
            // is kept under another name, and counts like any other.
            let renamed;
            let source = if source.starts_with("agentops:") {
                renamed = format!("untrusted-{source}");
                &renamed
            } else {
                source
            };
            // A line sent twice (a runner's retried report) is kept once.
            sqlx::query(
                "INSERT OR IGNORE INTO execution_logs (execution_id, seq, source, line, at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(seq)
            .bind(source)
            .bind(crate::api::report::truncate(line, MAX_LOG_LINE))
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        let (kept,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM execution_logs WHERE execution_id = ? AND source != ?")
                .bind(id)
                .bind(CUT_SOURCE)
                .fetch_one(&mut *tx)
                .await?;
        let excess = kept - (LOG_HEAD_LINES + LOG_TAIL_LINES);
        if excess > 0 {
            // The oldest lines after the head go.
            let gone: Vec<(i64,)> = sqlx::query_as(
                "SELECT seq FROM execution_logs WHERE execution_id = ? AND source != ? ORDER BY seq LIMIT ? OFFSET ?",
            )
            .bind(id)
            .bind(CUT_SOURCE)
            .bind(excess)
            .bind(LOG_HEAD_LINES)
            .fetch_all(&mut *tx)
            .await?;
            for (seq,) in &gone {
                sqlx::query("DELETE FROM execution_logs WHERE execution_id = ? AND seq = ?")
                    .bind(id)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
            }
            let marker: Option<(i64, String)> =
                sqlx::query_as("SELECT seq, line FROM execution_logs WHERE execution_id = ? AND source = ?")
                    .bind(id)
                    .bind(CUT_SOURCE)
                    .fetch_optional(&mut *tx)
                    .await?;
            let before = marker.as_ref().and_then(|(_, l)| l.split(' ').next()?.parse::<i64>().ok()).unwrap_or(0);
            let cut = before + gone.len() as i64;
            let text = format!(
                "{cut} log lines cut here: an execution keeps its first {LOG_HEAD_LINES} and its last {LOG_TAIL_LINES} lines"
            );
            match (marker, gone.first()) {
                (Some((seq, _)), _) => {
                    sqlx::query("UPDATE execution_logs SET line = ? WHERE execution_id = ? AND seq = ?")
                        .bind(text)
                        .bind(id)
                        .bind(seq)
                        .execute(&mut *tx)
                        .await?;
                }
                (None, Some((seq,))) => {
                    sqlx::query(
                        "INSERT INTO execution_logs (execution_id, seq, source, line, at) VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(id)
                    .bind(seq)
                    .bind(CUT_SOURCE)
                    .bind(text)
                    .bind(super::now())
                    .execute(&mut *tx)
                    .await?;
                }
                (None, None) => {}
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Keeps the diff of an execution (a cluster runner's, sent before its end).
    pub async fn set_diff(&self, id: &str, diff: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE agent_executions SET diff = ?, updated_at = ? WHERE id = ?")
            .bind(diff)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes the final state once: phase, usage, git, diff (when given) and the summary JSON.
    pub async fn finish_execution(
        &self,
        s: &Summary,
        error: Option<&str>,
        diff: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agent_executions SET status = ?, reason = ?, message = ?, error_message = ?, completed_at = ?,
               duration_ms = ?, input_tokens = ?, output_tokens = ?, cache_read_input_tokens = ?,
               cache_creation_input_tokens = ?, tokens_used = ?, cost_usd = ?, num_turns = ?, tool_calls = ?,
               tool_calls_by_tool = ?, session_id = ?, result = ?, git_commit = ?, pushed = ?, changed_files = ?,
               insertions = ?, deletions = ?, diff = COALESCE(?, diff), output_json = ?, pull_request_url = ?,
               pull_request_number = ?, pull_request_provider = ?, pull_request_state = ?, structured_output = ?,
               updated_at = ? WHERE id = ?",
        )
        .bind(s.phase.as_str())
        .bind(s.reason.as_deref())
        .bind(&s.message)
        .bind(error)
        .bind(&s.completion_time)
        .bind(i(s.duration_ms))
        .bind(i(s.usage.input_tokens))
        .bind(i(s.usage.output_tokens))
        .bind(i(s.usage.cache_read_input_tokens))
        .bind(i(s.usage.cache_creation_input_tokens))
        .bind(i(s.tokens_used))
        .bind(s.cost_usd)
        .bind(i(s.num_turns))
        .bind(i(s.tool_calls.total))
        .bind(serde_json::to_string(&s.tool_calls.by_tool).unwrap_or_else(|_| "{}".into()))
        .bind(&s.session_id)
        .bind(&s.result)
        .bind(&s.git.commit)
        .bind(s.git.pushed)
        .bind(i(s.git.changed_files))
        .bind(i(s.git.insertions))
        .bind(i(s.git.deletions))
        .bind(diff)
        .bind(serde_json::to_string(s).ok())
        .bind(s.git.pull_request.as_ref().map(|p| p.url.clone()))
        .bind(s.git.pull_request.as_ref().map(|p| i(p.number)))
        .bind(s.git.pull_request.as_ref().map(|p| p.provider.clone()))
        .bind(s.git.pull_request.as_ref().map(|p| p.state.clone()))
        .bind(s.output.as_ref().map(|o| o.to_string()))
        .bind(now())
        .bind(&s.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest executions first.
    pub async fn list_executions(&self, limit: i64) -> Result<Vec<ExecutionRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM agent_executions ORDER BY created_at DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// One execution by full id or unique prefix.
    pub async fn get_execution(&self, id: &str) -> Result<ExecutionRow, StoreError> {
        let escaped = id.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        let mut rows: Vec<ExecutionRow> =
            sqlx::query_as("SELECT * FROM agent_executions WHERE id = ? OR id LIKE ? ESCAPE '\\' LIMIT 2")
                .bind(id)
                .bind(format!("{escaped}%"))
                .fetch_all(&self.pool)
                .await?;
        if let Some(pos) = rows.iter().position(|r| r.id == id) {
            return Ok(rows.swap_remove(pos));
        }
        match rows.len() {
            0 => Err(StoreError::NotFound(id.into())),
            1 => Ok(rows.remove(0)),
            _ => Err(StoreError::Ambiguous(id.into())),
        }
    }

    /// Up to `limit` log lines of an execution after line `after`, in order (to stream them).
    pub async fn logs_page(&self, id: &str, after: i64, limit: i64) -> Result<Vec<LogLine>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT seq, source, line, at FROM execution_logs WHERE execution_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// All log lines of an execution, in order.
    pub async fn logs(&self, id: &str) -> Result<Vec<LogLine>, StoreError> {
        Ok(sqlx::query_as("SELECT seq, source, line, at FROM execution_logs WHERE execution_id = ? ORDER BY seq")
            .bind(id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The controller's executions that have not ended: (id, namespace, name). Runs of
    /// `agentops run` sharing the store file are not among them.
    pub async fn unfinished_cluster(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, namespace, name FROM agent_executions
             WHERE cluster = 1 AND status NOT IN ('Succeeded', 'Failed', 'Cancelled', 'TimedOut')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Ends an execution whose resource is gone (deleted while this controller did not watch):
    /// Cancelled, reason `Deleted`; its usage so far stays as recorded. Ended ones are left as
    /// they are.
    pub async fn mark_deleted(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agent_executions SET status = 'Cancelled', reason = 'Deleted', error_message = 'Deleted',
               message = 'the AgentExecution was deleted before it finished', completed_at = ?, updated_at = ?
             WHERE id = ? AND status NOT IN ('Succeeded', 'Failed', 'Cancelled', 'TimedOut')",
        )
        .bind(now())
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Executions in a given phase (e.g. those left Running by a crash).
    pub async fn count_in_phase(&self, phase: Phase) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM agent_executions WHERE status = ?")
            .bind(phase.as_str())
            .fetch_one(&self.pool)
            .await?)
    }
}

impl Store {
    /// Records an execution the controller saw, once (keyed by its id, the resource's uid).
    pub async fn ensure_execution(&self, e: &NewExecution<'_>) -> Result<(), StoreError> {
        self.insert_execution(e, "INSERT OR IGNORE", false).await
    }
}

impl Store {
    /// The newest execution with this namespace and name.
    pub async fn find_execution(&self, namespace: &str, name: &str) -> Result<ExecutionRow, StoreError> {
        sqlx::query_as(
            "SELECT * FROM agent_executions WHERE namespace = ? AND name = ? ORDER BY created_at DESC LIMIT 1",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("{namespace}/{name}")))
    }
}

impl Store {
    /// Namespaces that have executions in the store.
    pub async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT DISTINCT namespace FROM agent_executions ORDER BY namespace")
            .fetch_all(&self.pool)
            .await?)
    }

    /// The newest executions of these namespaces first (None: every namespace).
    pub async fn list_executions_in(
        &self,
        namespaces: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<ExecutionRow>, StoreError> {
        let Some(namespaces) = namespaces else { return self.list_executions(limit).await };
        if namespaces.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = sqlx::QueryBuilder::new("SELECT * FROM agent_executions WHERE namespace IN (");
        let mut list = q.separated(", ");
        for ns in namespaces {
            list.push_bind(ns);
        }
        q.push(") ORDER BY created_at DESC LIMIT ").push_bind(limit);
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        (dir, store)
    }

    async fn running(store: &Store, id: &str) {
        let e = NewExecution {
            id,
            name: id,
            namespace: "default",
            prompt: "p",
            repo_url: "http://127.0.0.1/r.git",
            branch: "agentops/x",
            model: None,
            worker: None,
            work_item: None,
            agent_config: None,
        };
        store.create_execution(&e).await.unwrap();
        store.mark_running(id, &now()).await.unwrap();
    }

    async fn set(store: &Store, id: &str, column: &str, value: &str) {
        let sql = format!("UPDATE agent_executions SET {column} = ? WHERE id = ?");
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(value).bind(id).execute(store.pool()).await.unwrap();
    }

    #[tokio::test]
    async fn only_rows_whose_process_is_gone_are_ended() {
        let (_dir, store) = store().await;
        for id in ["mine", "pid-reused", "rebooted", "elsewhere", "handed-on"] {
            running(&store, id).await;
        }
        store.create_workspace("ws-rebooted", "rebooted", "/tmp/x").await.unwrap();
        // The same pid now names a process started at another time; the machine restarted; a
        // process in another PID namespace (unknowable from here).
        set(&store, "pid-reused", "owner_start", "1").await;
        set(&store, "rebooted", "owner_boot_id", "an-earlier-boot").await;
        set(&store, "elsewhere", "owner_pid_ns", "pid:[1]").await;
        set(&store, "elsewhere", "owner_start", "1").await;
        set(&store, "handed-on", "owner_start", "1").await;
        sqlx::query("UPDATE agent_executions SET owner_pid = NULL WHERE id = 'handed-on'")
            .execute(store.pool())
            .await
            .unwrap();

        assert_eq!(store.end_abandoned().await.unwrap(), 2);
        for (id, status) in [
            ("mine", "Running"),
            ("pid-reused", "Failed"),
            ("rebooted", "Failed"),
            ("elsewhere", "Running"),
            ("handed-on", "Running"),
        ] {
            let row = store.get_execution(id).await.unwrap();
            assert_eq!(row.status, status, "{id}");
        }
        let row = store.get_execution("rebooted").await.unwrap();
        assert_eq!(row.reason.as_deref(), Some("RunnerLost"));
        assert!(row.message.as_deref().unwrap().contains("is gone"), "{:?}", row.message);
        let report = row.summary();
        assert_eq!((report.phase, report.reason.as_deref()), (crate::api::Phase::Failed, Some("RunnerLost")));
        assert!(row.output_json.is_some() && row.completed_at.is_some() && row.duration_ms.is_some());
        assert_eq!(store.list_workspaces().await.unwrap()[0].status, "error");
        assert_eq!(store.end_abandoned().await.unwrap(), 0, "once");

        // Closing hands this process's executions on: no later open ends them.
        store.release().await.unwrap();
        set(&store, "mine", "owner_start", "1").await;
        assert_eq!(store.end_abandoned().await.unwrap(), 0);
        assert_eq!(store.get_execution("mine").await.unwrap().status, "Running");
    }
}
