-- Sync health figures without full scans of the outbox (sync status, /sync, /metrics):
-- the last successful delivery, and the dead letters by lane.
CREATE INDEX outbox_delivered_at ON outbox (delivered_at);
CREATE INDEX outbox_dead ON outbox (lane, id) WHERE state = 'dead';
