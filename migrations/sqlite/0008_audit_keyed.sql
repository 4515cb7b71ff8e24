-- Which audit events are keyed: their `hash` is HMAC-SHA256 under the audit key
-- (kept outside the database). Events written before this migration stay unkeyed
-- (plain SHA-256 chain) and still verify.
ALTER TABLE audit_events ADD COLUMN keyed INTEGER NOT NULL DEFAULT 0 CHECK (keyed IN (0, 1));
