-- Bootstrap tokens rotator created. The secret half is stored only as a SHA-256
-- hash; the cluster holds the token itself until rotator deletes it.
CREATE TABLE bootstrap_tokens (
    id          TEXT COLLATE "C" PRIMARY KEY NOT NULL CHECK (length(id) = 6),
    secret_hash TEXT NOT NULL,
    description TEXT NOT NULL,
    groups      TEXT NOT NULL,              -- JSON array, each "system:bootstrappers:..."
    usages      TEXT NOT NULL,              -- JSON array: authentication, signing
    expires_at  BIGINT,                     -- NULL: never (only if policy allows it)
    state       TEXT NOT NULL CHECK (state IN ('creating', 'active', 'revoked', 'expired', 'failed')),
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    state_at    BIGINT NOT NULL
);
CREATE INDEX bootstrap_tokens_due ON bootstrap_tokens (state, expires_at);
