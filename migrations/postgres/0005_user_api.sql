-- Self-service (flow 2): one-time enrollment tokens and the key each client
-- credential was issued for.
--
-- The secret half of a token is stored only as a SHA-256 hash. The first
-- request that presents it claims the token for one public key (claimed_spki);
-- only a retry with that same key may use it again, which lets a client whose
-- response was lost get the same certificate back instead of a dead token.
CREATE TABLE enrollment_tokens (
    id            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    user_name     TEXT COLLATE "C" NOT NULL REFERENCES users (name),
    secret_hash   TEXT NOT NULL,
    expires_at    BIGINT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('active', 'claimed', 'used', 'revoked', 'expired')),
    claimed_spki  TEXT,                     -- SHA-256 of the SubjectPublicKeyInfo it was claimed for
    credential_id TEXT,                     -- the credential it was used for
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    state_at      BIGINT NOT NULL
);
CREATE INDEX enrollment_tokens_user ON enrollment_tokens (user_name, state);

-- SHA-256 of the certificate's SubjectPublicKeyInfo: a client retrying a renewal
-- whose response it never received is recognised by its key.
ALTER TABLE credentials ADD COLUMN spki_sha256 TEXT;
-- The credential whose holder asked for this one through /v1/renew.
ALTER TABLE credentials ADD COLUMN renewed_from TEXT;
CREATE INDEX credentials_spki ON credentials (spki_sha256);
