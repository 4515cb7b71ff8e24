-- "What changed since": the authorization webhook keeps credential and user
-- states in memory and refreshes them every second (and on every change its own
-- process makes). A single counter, bumped by triggers in the writing
-- transaction, stamps each changed row, so a refresh reads only rows whose
-- change_seq is above the last one it saw (SQLite has one writer at a time:
-- sequence order is commit order). Triggers rather than code, so no write path
-- (the CLI, the daemon, an older binary's statement) can forget it.
CREATE TABLE change_counter (
    id  INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq INTEGER NOT NULL
) STRICT;
INSERT INTO change_counter (id, seq) VALUES (1, 0);

ALTER TABLE credentials ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX credentials_change_seq ON credentials (change_seq);
CREATE INDEX users_change_seq ON users (change_seq);

-- The inner UPDATEs set only change_seq, which no trigger below watches: no recursion.
CREATE TRIGGER credentials_changed_insert AFTER INSERT ON credentials
BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE credentials SET change_seq = (SELECT seq FROM change_counter WHERE id = 1) WHERE id = NEW.id;
END;
CREATE TRIGGER credentials_changed_update
AFTER UPDATE OF state, state_at, state_reason, not_after, fingerprint, serial, generation_group, user_name ON credentials
BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE credentials SET change_seq = (SELECT seq FROM change_counter WHERE id = 1) WHERE id = NEW.id;
END;
CREATE TRIGGER users_changed_insert AFTER INSERT ON users
BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE users SET change_seq = (SELECT seq FROM change_counter WHERE id = 1) WHERE name = NEW.name;
END;
CREATE TRIGGER users_changed_update AFTER UPDATE OF state, name ON users
BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE users SET change_seq = (SELECT seq FROM change_counter WHERE id = 1) WHERE name = NEW.name;
END;
