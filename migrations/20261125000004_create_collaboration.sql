-- Collaboration: threads between agents, their messages, and task handoffs.
CREATE TABLE threads (
    id            uuid PRIMARY KEY,
    thread_type   text NOT NULL
                  CHECK (thread_type IN ('handoff', 'review', 'consultation', 'discussion', 'notification')),
    participants  uuid[] NOT NULL,
    task_id       uuid,
    workflow_id   uuid,
    title         text,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'resolved', 'abandoned')),
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    closed_at     timestamptz
);
CREATE INDEX threads_participants_idx ON threads USING gin (participants);
CREATE INDEX threads_task_idx ON threads (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX threads_status_idx ON threads (status, created_at DESC);

CREATE TABLE messages (
    id            uuid PRIMARY KEY,
    thread_id     uuid NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    sender_id     uuid NOT NULL,
    -- NULL: every participant but the sender.
    recipient_id  uuid,
    message_type  text NOT NULL DEFAULT 'text',
    content       text NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Participants who have read it.
    read_by       uuid[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- Newest-first listing per thread with an id cursor (v7 ids sort by time).
CREATE INDEX messages_thread_idx ON messages (thread_id, id DESC);

CREATE TABLE handoffs (
    id                uuid PRIMARY KEY,
    task_id           uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    thread_id         uuid REFERENCES threads (id) ON DELETE SET NULL,
    from_agent_id     uuid NOT NULL,
    -- A named target, or NULL for an open handoff to any agent with every capability.
    to_agent_id       uuid,
    capabilities      text[] NOT NULL DEFAULT '{}',
    reason            text NOT NULL DEFAULT '',
    context           jsonb NOT NULL DEFAULT '{}'::jsonb,
    on_decline        text NOT NULL DEFAULT 'reschedule' CHECK (on_decline IN ('reschedule', 'requester')),
    status            text NOT NULL DEFAULT 'requested'
                      CHECK (status IN ('requested', 'accepted', 'declined', 'expired', 'cancelled')),
    decided_by        uuid,
    decision_reason   text,
    expires_at        timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    decided_at        timestamptz
);
CREATE INDEX handoffs_open_idx ON handoffs (expires_at) WHERE status = 'requested';
CREATE INDEX handoffs_task_idx ON handoffs (task_id);

-- An accepted handoff pins the task's next dispatch to the acceptor.
ALTER TABLE tasks ADD COLUMN pinned_agent_id uuid;
