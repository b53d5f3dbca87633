-- What a version-checked update row has sent (sync_agent/updates.py): pairs of the version
-- each PUT went on and a keyed digest (Keyring.blind, hex) of its body without what the
-- server owns (id, meta, narrative); a JSON array of [version, digest], newest last, at most
-- 8, written before the PUT goes. A 412 whose upstream copy is the body this row sent on the
-- very version its edit is based on is our own PUT, its answer lost (a later edit rides on
-- the same row): the row goes again on that version instead of opening a review of our edit
-- against itself. Nothing looser: a body sent on another version, or by another row, may
-- have been put back at the EHR by someone since. An edit after a PUT answered with no
-- version finds its version by the last body the delivered row sent. NULL: nothing sent yet.
ALTER TABLE outbox ADD COLUMN sent TEXT;
-- How many times the EHR answered an update row 409 while its copy was still the version the
-- edit was based on (a lock there): after 5, a nurse decides. Counted apart from attempts,
-- which also count the link failing, so that four lost connections no longer made the first
-- 409 read as "refused 5 times".
ALTER TABLE outbox ADD COLUMN busy_409s INTEGER NOT NULL DEFAULT 0;
