-- Executions the controller recorded (from AgentExecution resources), as opposed to `agentops run`
-- on this machine, which may share the same store file: only the former are ended by the
-- controller's sweep when their resource is gone.
ALTER TABLE agent_executions ADD COLUMN cluster INTEGER NOT NULL DEFAULT 0;
