-- The process that runs an execution, recorded when it goes Running, so that a row left Running by
-- a process that is gone (killed, out of memory, the machine restarted) can be ended when the store
-- is next opened, and one whose process still runs is left alone. A process is named by the boot it
-- ran in, its PID namespace, its pid and its start time (clock ticks after boot): a pid alone is
-- reused. NULL: no process holds the row (a cluster record, or a pod's step that handed it on).
ALTER TABLE agent_executions ADD COLUMN owner_boot_id TEXT;
ALTER TABLE agent_executions ADD COLUMN owner_pid_ns TEXT;
ALTER TABLE agent_executions ADD COLUMN owner_pid INTEGER;
ALTER TABLE agent_executions ADD COLUMN owner_start INTEGER;
