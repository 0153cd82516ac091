-- The outbox keeps one row per committed transaction: the messages it announces, in order, as
-- three arrays of the same length. A step that moves thousands of tasks writes (and later
-- deletes) one row instead of one per event.
CREATE TABLE outbox_batches (
    seq        bigserial PRIMARY KEY,
    msg_ids    text[] NOT NULL,
    subjects   text[] NOT NULL,
    payloads   bytea[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(msg_ids) = cardinality(subjects)
           AND cardinality(subjects) = cardinality(payloads))
);
-- Rows live for milliseconds: compressing them would cost more than it saves.
ALTER TABLE outbox_batches
    ALTER COLUMN msg_ids SET STORAGE EXTERNAL,
    ALTER COLUMN subjects SET STORAGE EXTERNAL,
    ALTER COLUMN payloads SET STORAGE EXTERNAL;

-- What the one-row-per-message table still holds moves over, in order, as one batch.
INSERT INTO outbox_batches (msg_ids, subjects, payloads, created_at)
SELECT array_agg(msg_id ORDER BY seq), array_agg(subject ORDER BY seq),
       array_agg(payload ORDER BY seq), min(created_at)
FROM outbox
HAVING count(*) > 0;
DROP TABLE outbox;
