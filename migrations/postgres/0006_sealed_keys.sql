-- The private key of a credential that is stored but not yet delivered, sealed
-- (AES-256-GCM, key in sealing.key_file, the credential id as associated data),
-- so a failed or interrupted delivery is retried with the same credential.
-- Cleared in the transaction that makes the credential current, and whenever a
-- credential leaves the pending state.
ALTER TABLE credentials ADD COLUMN sealed_key TEXT;
