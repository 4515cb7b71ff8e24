-- rotator's state (PostgreSQL; mirrors migrations/sqlite/0001_init.sql). Times
-- are integer Unix seconds. Rows are never deleted: users are marked removed and
-- credentials keep their history. Integers are BIGINT (rotator reads every
-- integer as i64) and text sorts and compares byte-wise (COLLATE "C"), as in
-- SQLite, whatever the database's locale.

CREATE TABLE users (
    name        TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    groups      TEXT NOT NULL,              -- JSON array of group names (without generation groups)
    namespaces  TEXT NOT NULL,              -- JSON array of namespaces, one RoleBinding each
    role        TEXT NOT NULL,              -- ClusterRole bound in each namespace
    key_type    TEXT NOT NULL,
    ttl_seconds BIGINT NOT NULL CHECK (ttl_seconds >= 600),
    state       TEXT NOT NULL CHECK (state IN ('active', 'disabled', 'removed')),
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- The issuance saga's journal: one row per attempt, written before each external
-- step so any process can resume or abandon it. Its id is the credential id.
-- Generations come from here (max + 1), so an abandoned attempt's generation
-- group, which a signer may have put in a certificate we never stored, is never reused.
CREATE TABLE issuances (
    id          TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    user_name   TEXT COLLATE "C" NOT NULL,
    generation  BIGINT NOT NULL CHECK (generation >= 1),
    kind        TEXT NOT NULL CHECK (kind IN ('add-user', 'rotate', 'renew')),
    spec        TEXT NOT NULL,              -- JSON snapshot of the UserSpec
    step        TEXT NOT NULL CHECK (step IN ('planned', 'csr_submitted', 'approved', 'issued', 'stored', 'delivered', 'failed', 'abandoned')),
    signer      TEXT NOT NULL,
    csr_name    TEXT,
    error       TEXT,
    owner       TEXT NOT NULL,              -- "pid@boot-id" of the process running it
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (user_name, generation)
);
CREATE INDEX issuances_open ON issuances (user_name) WHERE step NOT IN ('delivered', 'failed', 'abandoned');

CREATE TABLE credentials (
    id           TEXT COLLATE "C" PRIMARY KEY NOT NULL REFERENCES issuances (id),
    user_name    TEXT COLLATE "C" NOT NULL REFERENCES users (name),
    generation   BIGINT NOT NULL,
    serial       TEXT NOT NULL,
    fingerprint  TEXT NOT NULL UNIQUE,      -- SHA-256 of the DER certificate
    not_before   BIGINT NOT NULL,
    not_after    BIGINT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'current', 'superseded', 'revoked', 'expired', 'failed')),
    signer       TEXT NOT NULL,
    csr_name     TEXT,
    key_type     TEXT NOT NULL,
    certificate  TEXT NOT NULL,             -- PEM; never the key
    state_reason TEXT,
    state_at     BIGINT NOT NULL,           -- when state last changed
    created_at   BIGINT NOT NULL,
    UNIQUE (user_name, generation)
);
-- The scheduler's "what is due" query.
CREATE INDEX credentials_due ON credentials (state, not_after);
-- At most one current credential per user, whatever a bug or a race attempts.
CREATE UNIQUE INDEX credentials_one_current ON credentials (user_name) WHERE state = 'current';

-- Hash-chained: hash = SHA-256 over (seq, time, actor, action, subject, detail, prev_hash).
CREATE TABLE audit_events (
    seq       BIGINT PRIMARY KEY NOT NULL,
    time      BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT COLLATE "C" NOT NULL,
    detail    TEXT NOT NULL,                -- JSON object
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_events_subject ON audit_events (subject);

-- Audit events are append-only, in the database as well as in the code
-- (TRUNCATE too, which has no row triggers).
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only';
END;
$$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- What a data directory was initialized with (the signer, its kubeconfig): a
-- database's credentials all come from one signer.
CREATE TABLE meta (
    key   TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
