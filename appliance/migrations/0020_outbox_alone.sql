-- An item set aside (sync_agent.outbox_delivery: the upstream failed every bundle it was in,
-- then it alone, and answered its metadata: the item is at fault, not the link) goes alone
-- when due again, until the upstream answers it. Before, that was known to the sync process's
-- memory only: after a restart the item joined full bundles again, each failed whole, and
-- the queue behind it was bisected anew over rounds that read "link down". 1: alone.
ALTER TABLE outbox ADD COLUMN alone INTEGER NOT NULL DEFAULT 0;
