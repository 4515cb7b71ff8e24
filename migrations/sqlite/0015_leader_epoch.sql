-- The leader's epoch (fencing token). A daemon that becomes the leader bumps it
-- in its own transaction; every write transaction of a job it runs then commits
-- only while the epoch is still the one it took (`UPDATE ... WHERE epoch = mine`
-- must change the row), so a leader that lost the Lease (paused, partitioned,
-- slow) can no longer commit anything. One row; plain SQL on both engines.
CREATE TABLE leader_epoch (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    epoch  INTEGER NOT NULL,
    holder TEXT NOT NULL,
    since  INTEGER NOT NULL
);
INSERT INTO leader_epoch (id, epoch, holder, since) VALUES (1, 0, '', 0);
