-- "What changed since" (see migrations/sqlite/0013_change_seq.sql): one counter,
-- bumped by triggers in the writing transaction, stamps each changed credential
-- and user row. Every write transaction takes the one writer advisory lock
-- (src/store/engine/postgres.rs), so here too counter order is commit order.
CREATE TABLE change_counter (
    id  BIGINT PRIMARY KEY NOT NULL CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO change_counter (id, seq) VALUES (1, 0);

ALTER TABLE credentials ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX credentials_change_seq ON credentials (change_seq);
CREATE INDEX users_change_seq ON users (change_seq);

-- BEFORE triggers set NEW.change_seq in place: no second UPDATE, no recursion.
CREATE FUNCTION stamp_change_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq INTO NEW.change_seq;
    RETURN NEW;
END
$$;

CREATE TRIGGER credentials_changed_insert BEFORE INSERT ON credentials
    FOR EACH ROW EXECUTE FUNCTION stamp_change_seq();
CREATE TRIGGER credentials_changed_update
    BEFORE UPDATE OF state, state_at, state_reason, not_after, fingerprint, serial, generation_group, user_name ON credentials
    FOR EACH ROW EXECUTE FUNCTION stamp_change_seq();
CREATE TRIGGER users_changed_insert BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION stamp_change_seq();
CREATE TRIGGER users_changed_update BEFORE UPDATE OF state, name ON users
    FOR EACH ROW EXECUTE FUNCTION stamp_change_seq();
