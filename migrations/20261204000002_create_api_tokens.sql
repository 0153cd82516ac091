-- API tokens: bearer tokens for the HTTP API and WebSockets, stored as SHA-256 hashes (the
-- token itself is shown once, when created). A token acts with its role; an `agent` token only
-- as the agent names it lists.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'agent', 'viewer')),
    agents       text[] NOT NULL DEFAULT '{}',
    token_hash   bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);

-- A name is unique among tokens not revoked.
CREATE UNIQUE INDEX api_tokens_live_name_idx ON api_tokens (name) WHERE revoked_at IS NULL;
