//! Workspace records: active → completed/error → cleaning → cleaned.

use super::{Store, StoreError, now};

/// Lifecycle of a workspace directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspaceStatus {
    Active,
    Completed,
    Error,
    Cleaning,
    Cleaned,
}

impl WorkspaceStatus {
    /// The value in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Error => "error",
            Self::Cleaning => "cleaning",
            Self::Cleaned => "cleaned",
        }
    }
}

/// One row of `workspaces`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct WorkspaceRow {
    pub id: String,
    pub execution_id: String,
    pub path: String,
    pub status: String,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub cleanup_at: Option<String>,
}

impl Store {
    /// Records a new active workspace and links it to its execution.
    pub async fn create_workspace(&self, id: &str, execution_id: &str, path: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workspaces (id, execution_id, path, status, created_at) VALUES (?, ?, ?, 'active', ?)",
        )
        .bind(id)
        .bind(execution_id)
        .bind(path)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE agent_executions SET workspace_id = ?, updated_at = ? WHERE id = ?")
            .bind(id)
            .bind(now())
            .bind(execution_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves a workspace to a new status, stamping completion or cleanup time.
    pub async fn set_workspace_status(&self, id: &str, status: WorkspaceStatus) -> Result<(), StoreError> {
        // Static statements per column: sqlx refuses SQL built at run time.
        let sql = match status {
            WorkspaceStatus::Completed | WorkspaceStatus::Error => {
                "UPDATE workspaces SET status = ?, completed_at = ? WHERE id = ?"
            }
            WorkspaceStatus::Cleaning | WorkspaceStatus::Cleaned => {
                "UPDATE workspaces SET status = ?, cleanup_at = ? WHERE id = ?"
            }
            WorkspaceStatus::Active => "UPDATE workspaces SET status = ?, created_at = ? WHERE id = ?",
        };
        sqlx::query(sql).bind(status.as_str()).bind(now()).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// All workspaces, newest first.
    pub async fn list_workspaces(&self) -> Result<Vec<WorkspaceRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM workspaces ORDER BY created_at DESC").fetch_all(&self.pool).await?)
    }

    /// Finished (or abandoned) workspaces not yet cleaned whose last change is before `before`.
    pub async fn stale_workspaces(&self, before: &str) -> Result<Vec<WorkspaceRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT * FROM workspaces WHERE status IN ('completed', 'error', 'cleaning')
               AND COALESCE(completed_at, created_at) < ? ORDER BY created_at",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?)
    }
}

impl Store {
    /// Workspaces of executions in these namespaces, newest first (None: all).
    pub async fn list_workspaces_in(&self, namespaces: Option<&[String]>) -> Result<Vec<WorkspaceRow>, StoreError> {
        let Some(namespaces) = namespaces else { return self.list_workspaces().await };
        if namespaces.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = sqlx::QueryBuilder::new(
            "SELECT w.* FROM workspaces w JOIN agent_executions e ON e.id = w.execution_id WHERE e.namespace IN (",
        );
        let mut list = q.separated(", ");
        for ns in namespaces {
            list.push_bind(ns);
        }
        q.push(") ORDER BY w.created_at DESC");
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }
}
