-- What the cluster's policies decided for an execution when the controller started it
-- (status.policy), kept where tenants cannot write: a started execution runs with these limits,
-- and only an execution recorded here counts as started (a status written by someone else
-- neither skips the policies nor changes the limits a restarted controller reopens it with).
CREATE TABLE execution_policy (
    uid TEXT PRIMARY KEY NOT NULL,
    -- JSON of the PolicyRecord; 'null' when no policy applied.
    record TEXT NOT NULL,
    created_at TEXT NOT NULL
);
