-- The pull request (merge request) the operator opened or updated for the pushed branch, and the
-- agent's structured output (spec.agent.outputSchema), as columns one can query. The whole report
-- (output_json) carries them too.
ALTER TABLE agent_executions ADD COLUMN pull_request_url TEXT;
ALTER TABLE agent_executions ADD COLUMN pull_request_number INTEGER;
ALTER TABLE agent_executions ADD COLUMN pull_request_provider TEXT;
ALTER TABLE agent_executions ADD COLUMN pull_request_state TEXT;
ALTER TABLE agent_executions ADD COLUMN structured_output TEXT;
