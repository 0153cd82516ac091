-- Tasks: one node of a workflow's DAG, with its state machine (src/domain/task.rs).
CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    workflow_id      uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    key              text NOT NULL,
    executor         text NOT NULL DEFAULT 'echo',
    capabilities     text[] NOT NULL DEFAULT '{}',
    input            jsonb NOT NULL DEFAULT '{}'::jsonb,
    output           jsonb,
    depends_on       text[] NOT NULL DEFAULT '{}',
    resources        jsonb NOT NULL DEFAULT '[]'::jsonb,
    priority         text NOT NULL DEFAULT 'MEDIUM'
                     CHECK (priority IN ('CRITICAL', 'HIGH', 'MEDIUM', 'LOW')),
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'ready', 'assigned', 'running', 'retry_wait',
                                       'completed', 'failed', 'cancelled')),
    -- Number of dispatches so far; the current one is the fencing token results must carry.
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Failed attempts; the task fails for good when failures reaches max_attempts.
    failures         integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    timeout_seconds  integer CHECK (timeout_seconds > 0),
    agent_id         uuid,
    error            text,
    retry_at         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    ready_at         timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (workflow_id, key)
);

-- Dispatch picks ready tasks; the sweeper finds due retries and tasks held by lost agents.
CREATE INDEX tasks_active_idx ON tasks (status, priority)
    WHERE status IN ('ready', 'assigned', 'running', 'retry_wait');
CREATE INDEX tasks_agent_idx ON tasks (agent_id) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_retry_due_idx ON tasks (retry_at) WHERE status = 'retry_wait';
