-- Items still waiting that carry an error: an entry the upstream answered without taking
-- it (our access refused, a 5xx of its own, no answer), or one it failed whole bundles for,
-- set aside. `sync status`, /sync and /metrics count those tried again and again
-- (sync_agent.outbox_delivery.failing_items) in one step of this index, whatever the size
-- of the queue; a long outage writes no error to the rows, so the index stays small.
CREATE INDEX outbox_failing ON outbox (id) WHERE state = 'pending' AND last_error IS NOT NULL;
