//! Team budgets' spend per period (`team_budget_spend`).

use super::{Store, StoreError, now};

impl Store {
    /// What `budget` spent in the period starting at `period_start`, and whether it was found
    /// exhausted (None: nothing recorded).
    pub async fn budget_spent(&self, budget: &str, period_start: &str) -> Result<Option<(f64, bool)>, StoreError> {
        let row: Option<(f64, i64)> =
            sqlx::query_as("SELECT spent_usd, exhausted FROM team_budget_spend WHERE budget = ? AND period_start = ?")
                .bind(budget)
                .bind(period_start)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|r| (r.0, r.1 != 0)))
    }

    /// Records what `budget` spent so far in the period (never lowers a recorded figure: two
    /// controllers for a moment, or a late write, cannot undo spend).
    pub async fn set_budget_spent(
        &self,
        budget: &str,
        period_start: &str,
        spent_usd: f64,
        exhausted: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO team_budget_spend (budget, period_start, spent_usd, exhausted, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (budget, period_start) DO UPDATE SET spent_usd = max(spent_usd, excluded.spent_usd),
             exhausted = excluded.exhausted, updated_at = excluded.updated_at",
        )
        .bind(budget)
        .bind(period_start)
        .bind(spent_usd)
        .bind(i64::from(exhausted))
        .bind(now())
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

impl Store {
    /// Records what the policies decided for an execution as it starts (the first record wins:
    /// a start is decided once).
    pub async fn set_execution_policy(
        &self,
        uid: &str,
        record: Option<&crate::api::PolicyRecord>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(&record).unwrap_or_else(|_| "null".into());
        sqlx::query("INSERT OR IGNORE INTO execution_policy (uid, record, created_at) VALUES (?, ?, ?)")
            .bind(uid)
            .bind(json)
            .bind(now())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// What the policies decided when the execution started: None when it was never started by
    /// a controller of this store; Some(None) when no policy applied.
    pub async fn execution_policy(&self, uid: &str) -> Result<Option<Option<crate::api::PolicyRecord>>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT record FROM execution_policy WHERE uid = ?")
            .bind(uid)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|(json,)| serde_json::from_str(&json).ok().flatten()))
    }
}
