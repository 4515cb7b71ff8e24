-- Where the daemon delivers a user's reissued kubeconfigs: "dir" (the delivery
-- directory) or "secret:NAMESPACE/NAME".
ALTER TABLE users ADD COLUMN delivery TEXT NOT NULL DEFAULT 'dir';
