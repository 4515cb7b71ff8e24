-- A user record's incarnation: a new random value each time a name is added
-- (or re-added after removal). Enrollment tokens are bound to the incarnation
-- they were made for, so a re-added user never inherits an old token.
ALTER TABLE users ADD COLUMN incarnation TEXT;
ALTER TABLE enrollment_tokens ADD COLUMN user_incarnation TEXT;

-- The generation group in the credential's certificate: `rotator:USER:GEN.SUFFIX`,
-- the suffix taken from the certificate's public key, so a group names one
-- credential for ever, even after the database is restored from an older backup
-- or recreated. NULL for credentials from before (their group is `rotator:USER:GEN`).
ALTER TABLE credentials ADD COLUMN generation_group TEXT;
