-- A task's transitions before its end (pending → ready → assigned → running, a requeue, a
-- retry's wait) change no column any index reads, so PostgreSQL writes each as a heap-only
-- tuple: a new row version on the same page and no index entry, instead of one entry in every
-- index. No index reads `status`, `agent_id` or `attempt`: the leader finds the tasks agents
-- hold by id, from its memory; unfinished tasks are found by `finished_at`, which changes once.
DROP INDEX tasks_active_idx;
DROP INDEX tasks_agent_idx;
DROP INDEX tasks_unfinished_idx;
DROP INDEX tasks_coordination_idx;
DROP INDEX tasks_retry_due_idx;

CREATE INDEX tasks_open_idx ON tasks (workflow_id) WHERE finished_at IS NULL;
CREATE INDEX tasks_open_nodes_idx ON tasks (workflow_id) WHERE kind <> 'task' AND finished_at IS NULL;
-- Set when a task starts waiting for a retry, cleared when it stops.
CREATE INDEX tasks_retry_due_idx ON tasks (retry_at) WHERE retry_at IS NOT NULL;

-- Room on each page for the new versions of its rows.
ALTER TABLE tasks SET (fillfactor = 75);
