-- Workflows: a named DAG of tasks and its overall status.
CREATE TABLE workflows (
    id              uuid PRIMARY KEY,
    name            text NOT NULL,
    status          text NOT NULL DEFAULT 'running'
                    CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    failure_policy  text NOT NULL DEFAULT 'fail_fast'
                    CHECK (failure_policy IN ('fail_fast', 'continue')),
    spec            jsonb NOT NULL DEFAULT '{}'::jsonb,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

-- The scheduler rebuilds the graphs of running workflows when it becomes leader.
CREATE INDEX workflows_running_idx ON workflows (created_at) WHERE status = 'running';
CREATE INDEX workflows_created_idx ON workflows (created_at DESC);
