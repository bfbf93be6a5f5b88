-- The store of the original backend: workspaces and agent executions, plus their logs.
CREATE TABLE workspaces (
    id            TEXT PRIMARY KEY,
    execution_id  TEXT NOT NULL,
    path          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('active', 'completed', 'error', 'cleaning', 'cleaned')),
    created_at    TEXT NOT NULL,
    completed_at  TEXT,
    cleanup_at    TEXT
);
CREATE INDEX workspaces_status ON workspaces (status, completed_at);

CREATE TABLE agent_executions (
    id                          TEXT PRIMARY KEY,
    name                        TEXT NOT NULL,
    namespace                   TEXT NOT NULL,
    workspace_id                TEXT REFERENCES workspaces (id),
    status                      TEXT NOT NULL,
    reason                      TEXT,
    message                     TEXT,
    error_message               TEXT,
    prompt                      TEXT NOT NULL,
    repo_url                    TEXT NOT NULL,
    branch                      TEXT,
    model                       TEXT,
    worker                      TEXT,
    work_item                   TEXT,
    created_at                  TEXT NOT NULL,
    started_at                  TEXT,
    completed_at                TEXT,
    updated_at                  TEXT NOT NULL,
    duration_ms                 INTEGER,
    input_tokens                INTEGER NOT NULL DEFAULT 0,
    output_tokens               INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens     INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    tokens_used                 INTEGER NOT NULL DEFAULT 0,
    cost_usd                    REAL NOT NULL DEFAULT 0,
    num_turns                   INTEGER NOT NULL DEFAULT 0,
    tool_calls                  INTEGER NOT NULL DEFAULT 0,
    tool_calls_by_tool          TEXT NOT NULL DEFAULT '{}',
    session_id                  TEXT,
    result                      TEXT,
    git_commit                  TEXT,
    pushed                      INTEGER NOT NULL DEFAULT 0,
    changed_files               INTEGER NOT NULL DEFAULT 0,
    insertions                  INTEGER NOT NULL DEFAULT 0,
    deletions                   INTEGER NOT NULL DEFAULT 0,
    diff                        TEXT,
    output_json                 TEXT
);
CREATE INDEX agent_executions_created ON agent_executions (created_at);
CREATE INDEX agent_executions_name ON agent_executions (namespace, name);

CREATE TABLE execution_logs (
    execution_id TEXT NOT NULL REFERENCES agent_executions (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    source       TEXT NOT NULL,
    line         TEXT NOT NULL,
    at           TEXT NOT NULL,
    PRIMARY KEY (execution_id, seq)
);
