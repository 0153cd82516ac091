-- The executors an agent runs (`shell`, `http`, a custom name…); `*` = whatever it is given.
-- The scheduler gives a task only to an agent that offers its executor.
ALTER TABLE agents ADD COLUMN executors text[] NOT NULL DEFAULT '{*}';
