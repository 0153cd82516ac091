-- The transactional outbox: every event (and inbox delivery) is written here in the same
-- transaction as the state change it describes, then published to NATS with its id as
-- Nats-Msg-Id and deleted once JetStream stored it. A row still here after a crash is published
-- again by the next leader (JetStream drops the duplicate within its window).
CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    msg_id     text NOT NULL,
    subject    text NOT NULL,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Scheduling touches a workflow's unfinished tasks often (is anything left?); with this it
-- does not read the finished ones, however many there are.
CREATE INDEX tasks_unfinished_idx ON tasks (workflow_id)
    WHERE status IN ('pending', 'ready', 'assigned', 'running', 'retry_wait');
