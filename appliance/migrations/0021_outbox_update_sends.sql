-- What a version-checked update row has sent (sync_agent/updates.py): keyed digests
-- (Keyring.blind, hex; a JSON array, newest last, at most 8) of each body it PUT, without
-- what the server owns (id, meta, narrative), written before the PUT goes. An upstream copy
-- that is one of them is our own PUT, whose answer may have been lost: a 412 meeting it (a
-- later edit rides on the same row) sends the row again on that version, instead of opening
-- a review of our edit against itself; an edit after a PUT answered with no version finds
-- its version the same way. NULL: nothing sent yet.
ALTER TABLE outbox ADD COLUMN sent TEXT;
-- How many times the EHR answered an update row 409 while its copy was still the version the
-- edit was based on (a lock there): after 5, a nurse decides. Counted apart from attempts,
-- which also count the link failing, so that four lost connections no longer made the first
-- 409 read as "refused 5 times".
ALTER TABLE outbox ADD COLUMN busy_409s INTEGER NOT NULL DEFAULT 0;
