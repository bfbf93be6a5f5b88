-- What each team budget (AgentBudget) spent in each period, as the controller's gateway metered
-- it: kept across restarts, so a new controller goes on from the figure the last one reached.
-- A period is keyed by its start (UTC, RFC 3339); a new period starts at zero.
CREATE TABLE team_budget_spend (
    budget TEXT NOT NULL,
    period_start TEXT NOT NULL,
    spent_usd REAL NOT NULL,
    -- 1 once a request could not be paid even alone: new executions wait for the reset.
    exhausted INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (budget, period_start)
);
