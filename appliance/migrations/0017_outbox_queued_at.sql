-- When each item joined the outbox, or joined it again when staff sent a dead letter again
-- (Unix milliseconds, the writer's clock). The oldest waiting item's age (/sync, `sync
-- status`, /healthz, /metrics, the sync-backlog staff alert) is read from here. Before, it
-- came from the resource's UUIDv7: a waiting edit of a Patient made months ago, or a dead
-- letter sent again, read as old as the record and set off the backlog alert.
ALTER TABLE outbox ADD COLUMN queued_at INTEGER;

-- Items not yet delivered, from before this column: a create joined when its resource was
-- made, the time in its UUIDv7's first 48 bits (12 hex digits, read one by one below); an
-- update, or an id not laid out as ours, from the time of this migration.
WITH RECURSIVE digits (id, hex, position, value) AS (
    SELECT o.id, lower(substr(replace(r.logical_id, '-', ''), 1, 12)), 0, 0
    FROM outbox o JOIN resources r ON r.id = o.resource_id
    WHERE o.state != 'delivered' AND o.kind = 'create'
    UNION ALL
    SELECT id, hex, position + 1,
           value * 16 + instr('0123456789abcdef', substr(hex, position + 1, 1)) - 1
    FROM digits WHERE position < 12
)
UPDATE outbox SET queued_at = digits.value
FROM digits
WHERE digits.id = outbox.id AND digits.position = 12
  AND length(digits.hex) = 12 AND digits.hex NOT GLOB '*[^0-9a-f]*';

UPDATE outbox SET queued_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
WHERE state != 'delivered' AND queued_at IS NULL;

-- The oldest waiting item of a lane in one index step. It is not the first pending row by
-- id: a dead letter sent again keeps its place (its id) but joins the queue anew.
CREATE INDEX outbox_waiting ON outbox (lane, queued_at) WHERE state = 'pending';
