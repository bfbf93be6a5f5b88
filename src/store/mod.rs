//! The store: a SQLite file through sqlx. Executions, their workspaces and their logs.

mod budgets;
mod executions;
mod owner;
mod workspaces;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

pub use executions::{
    CUT_SOURCE, ExecutionRow, LOG_HEAD_LINES, LOG_TAIL_LINES, LogLine, MAX_LOG_LINE, NewExecution, Progress,
};
pub use workspaces::{WorkspaceRow, WorkspaceStatus};

/// A store error, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot migrate the store at {path}: {source}")]
    Migrate { path: String, source: sqlx::migrate::MigrateError },
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("no execution matches {0:?}; see `agentops executions list`")]
    NotFound(String),
    #[error("{0:?} matches several executions; give more of the id")]
    Ambiguous(String),
}

/// Handle to the SQLite store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the store file, applies migrations, and ends the executions
    /// left Running by a process that is gone (see `end_abandoned`).
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Open { path: shown.clone(), source: sqlx::Error::Io(e) })?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| StoreError::Open { path: shown.clone(), source: e })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            // Few writers (one runner, or the controller's leader): a small pool is enough,
            // and each SQLite connection keeps its own page cache.
            .max_connections(2)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open { path: shown.clone(), source: e })?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(|e| StoreError::Migrate { path: shown, source: e })?;
        let store = Self { pool };
        match store.end_abandoned().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(executions = n, "ended executions whose process is gone"),
            // Reading still works; the next open tries again.
            Err(e) => tracing::warn!(error = %e, "cannot end the executions whose process is gone"),
        }
        Ok(store)
    }

    /// Opens a store another process wrote and closed, only to read it, from a read-only
    /// place (a runner pod's step reading the agent step's store): no migration, no journal.
    pub async fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| StoreError::Open { path: shown.clone(), source: e })?
            .filename(path)
            .read_only(true)
            .immutable(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open { path: shown, source: e })?;
        Ok(Self { pool })
    }

    /// Closes every connection (the last one folds the write-ahead log into the file). The
    /// executions this process holds Running are handed on: closing is how a pod's step says it
    /// ended on purpose and the next step takes the execution over (see `release`).
    pub async fn close(&self) {
        if let Err(e) = self.release().await {
            tracing::debug!(error = %e, "cannot hand on this process's executions");
        }
        self.pool.close().await;
    }

    /// The connection pool, for queries this module does not wrap.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Now, as the RFC 3339 text the store keeps.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
