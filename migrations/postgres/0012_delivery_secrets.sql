-- The Secrets rotator created to deliver kubeconfigs (add-user --deliver
-- secret:NS/NAME), by the uid the API server gave each at creation. rotator
-- writes a Secret only when it is that very object (the write is conditional on
-- the uid), so it never takes over a Secret someone else made, and it needs no
-- permission to read Secrets to know which are its own.
CREATE TABLE delivery_secrets (
    namespace  TEXT COLLATE "C" NOT NULL,
    name       TEXT COLLATE "C" NOT NULL,
    user_name  TEXT NOT NULL,
    uid        TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
