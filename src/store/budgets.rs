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
