-- One change stamp per writing transaction instead of one per row. Bumping the
-- one counter row for every row a transaction changes made large transactions
-- quadratic on PostgreSQL (each UPDATE of that row in the same transaction
-- walks the versions the earlier ones left): 100,000 users in one transaction,
-- as `rotator database copy` writes them, did not finish in 8 minutes.
-- The first stamped row of a transaction bumps the counter and keeps the value
-- in a transaction-local setting; the others reuse it. Writers are serialized
-- by the writer advisory lock, so stamps still follow commit order, and a
-- reader that saw the counter at N has seen every row of transaction N (they
-- commit together). A savepoint rolled back reverts both the bump and the
-- setting.
CREATE OR REPLACE FUNCTION stamp_change_seq() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    -- '' once a local setting has reverted in this session: not set.
    stamp BIGINT := NULLIF(current_setting('rotator.change_seq', true), '')::BIGINT;
BEGIN
    IF stamp IS NULL THEN
        UPDATE change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq INTO stamp;
        PERFORM set_config('rotator.change_seq', stamp::text, true);
    END IF;
    NEW.change_seq := stamp;
    RETURN NEW;
END
$$;
