-- Until when an item whose answer was lost (a timeout after the request went, a 504) must not
-- be sent again: the upstream may be applying that request still, and a conditional create
-- racing it can make a second copy (sync_agent.outbox_delivery). Set with next_attempt_at
-- when the answer is lost; "sync now" (any process: the sync process, `appliance sync once`)
-- clears a per-item backoff but leaves this wait. Before, it was kept in the sync process's
-- memory only, and `sync once` or a restarted process made such items due at once.
-- ISO 8601 UTC text, as next_attempt_at; NULL (or passed) when no such wait runs.
ALTER TABLE outbox ADD COLUMN unsure_until TEXT;
