-- The leader's epoch (fencing token); the twin of migrations/sqlite/0015. A
-- daemon that becomes the leader bumps it in its own transaction; every write
-- transaction of a job it runs then commits only while the epoch is still the
-- one it took (`UPDATE ... WHERE epoch = mine` must change the row, and takes
-- the row's lock, so a bump in flight orders it before or after), so a leader
-- that lost the Lease (paused, partitioned, slow) can no longer commit anything.
CREATE TABLE leader_epoch (
    id     BIGINT PRIMARY KEY CHECK (id = 1),
    epoch  BIGINT NOT NULL,
    holder TEXT NOT NULL,
    since  BIGINT NOT NULL
);
INSERT INTO leader_epoch (id, epoch, holder, since) VALUES (1, 0, '', 0);
