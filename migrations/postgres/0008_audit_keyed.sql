-- Which audit events are keyed: their `hash` is HMAC-SHA256 under the audit key
-- (kept outside the database). Events written before this migration stay unkeyed
-- (plain SHA-256 chain) and still verify. An integer, as in SQLite (rotator reads 0/1).
ALTER TABLE audit_events ADD COLUMN keyed BIGINT NOT NULL DEFAULT 0 CHECK (keyed IN (0, 1));
