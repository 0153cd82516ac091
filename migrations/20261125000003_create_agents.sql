-- Agents: the registry's record (mirrored live into the <ns>_agents KV bucket).
CREATE TABLE agents (
    id               uuid PRIMARY KEY,
    name             text NOT NULL,
    agent_type       text NOT NULL DEFAULT 'worker',
    phase_id         text,
    capabilities     text[] NOT NULL DEFAULT '{}',
    capacity         integer NOT NULL CHECK (capacity >= 1),
    current_load     integer NOT NULL DEFAULT 0 CHECK (current_load >= 0),
    status           text NOT NULL DEFAULT 'idle'
                     CHECK (status IN ('idle', 'running', 'degraded', 'maintenance', 'stale',
                                       'offline', 'terminated', 'quarantined')),
    health_status    text NOT NULL DEFAULT 'healthy'
                     CHECK (health_status IN ('healthy', 'stale', 'unresponsive', 'unknown')),
    last_heartbeat   timestamptz,
    last_assigned_at timestamptz,
    tags             text[] NOT NULL DEFAULT '{}',
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A name is unique among agents that are not deregistered.
CREATE UNIQUE INDEX agents_live_name_idx ON agents (name) WHERE status <> 'terminated';
-- Search: "has every capability" is `capabilities @> $1`, served by GIN.
CREATE INDEX agents_capabilities_idx ON agents USING gin (capabilities);
CREATE INDEX agents_tags_idx ON agents USING gin (tags);
-- The liveness sweeper scans agents expected to heartbeat by last heartbeat.
CREATE INDEX agents_heartbeat_idx ON agents (last_heartbeat)
    WHERE status IN ('idle', 'running', 'degraded', 'maintenance', 'stale');
