-- The agent's configuration an execution ran with (spec.agent: instructions, permission rules,
-- setting sources, MCP servers, skills, subagents): its hash (status.agentConfigHash) as a column
-- one can query, and what it held (names and counts as JSON, never a Secret's value). Written when
-- the execution is recorded, so an interrupted run says what it ran with too.
ALTER TABLE agent_executions ADD COLUMN agent_config_hash TEXT;
ALTER TABLE agent_executions ADD COLUMN agent_config TEXT;
