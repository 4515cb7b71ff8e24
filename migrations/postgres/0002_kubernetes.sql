-- When the credential's generation group was last taken out of the cluster's
-- RoleBindings (after revocation, expiry, or a superseded credential's grace
-- period). NULL while it may still be granted: the scheduler's work list.
ALTER TABLE credentials ADD COLUMN access_removed_at BIGINT;
CREATE INDEX credentials_access_pending ON credentials (state, access_removed_at);
