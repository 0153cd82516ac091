-- Coordination nodes (src/domain/coordination.rs): sync points, merges, splits and loops are
-- task rows run by the coordinator; any task may join on a quorum of its dependencies.
ALTER TABLE tasks
    ADD COLUMN kind text NOT NULL DEFAULT 'task'
        CHECK (kind IN ('task', 'sync', 'merge', 'split', 'loop')),
    -- Completed dependencies needed before the task runs; NULL: all of them.
    ADD COLUMN join_quorum integer CHECK (join_quorum >= 1),
    -- The node's spec (SyncSpec, MergeSpec, SplitSpec or LoopSpec as JSON).
    ADD COLUMN coordination jsonb,
    -- Expansions done: a split's children inserted (1), a loop's iterations inserted.
    ADD COLUMN expansion integer NOT NULL DEFAULT 0 CHECK (expansion >= 0),
    -- A sync point whose timeout passed and that continues with what finished.
    ADD COLUMN timed_out boolean NOT NULL DEFAULT false,
    -- How long the completed attempt waited for its resource locks (reported by the worker).
    ADD COLUMN lock_wait_ms bigint;

-- The coordinator finds ready nodes and pending sync points with a timeout.
CREATE INDEX tasks_coordination_idx ON tasks (status) WHERE kind <> 'task';
