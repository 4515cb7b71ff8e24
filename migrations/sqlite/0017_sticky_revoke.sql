-- A revoke of a user (not of one serial) is sticky: `revoke USER` sets the
-- user's state to 'disabled' and records when and by whom, in its own
-- transaction; nothing issues to the user again (rotate, renewal, enrollment,
-- bulk rerun, scheduled pass) until an administrator reinstates them on
-- purpose (`rotator rotate USER --reinstate`), which clears both columns.
ALTER TABLE users ADD COLUMN revoked_at INTEGER;
ALTER TABLE users ADD COLUMN revoked_by TEXT;

-- Whether an enrollment token reached its destination: `add-user --from`
-- writes NAME.token after the token's transaction commits, so a run killed in
-- between leaves an active token nobody has. A rerun issues a new one for a
-- token never marked delivered. Tokens from before were handed out.
ALTER TABLE enrollment_tokens ADD COLUMN delivered_at INTEGER;
UPDATE enrollment_tokens SET delivered_at = created_at;
