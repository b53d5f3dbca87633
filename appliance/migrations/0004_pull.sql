-- Pull-down and version-checked updates (issue 5).
-- Plain columns hold no PHI: upstream references are the server's opaque '<Type>/<id>' (like
-- outbox.upstream_ref), versions and timestamps are the server's. Every resource body kept
-- here is sealed (Keyring.seal, its own label, bound to the row; re-sealed on key rotation:
-- appliance/key_rotation.py SEALED_COLUMNS).

-- Which upstream resource a local one is: pulled from it ('pulled'), or made here and
-- delivered as it ('delivered', learnt from the outbox). version_id is the upstream version
-- the local copy is based on: the If-Match of the next local edit. NULL while unknown (a
-- resource we created, before anyone read its version back).
CREATE TABLE upstream_links (
    resource_id  INTEGER PRIMARY KEY REFERENCES resources (id),
    upstream_ref TEXT NOT NULL UNIQUE,
    version_id   TEXT,
    last_updated TEXT,
    origin       TEXT NOT NULL CHECK (origin IN ('pulled', 'delivered')),
    synced_at    TEXT NOT NULL
);

-- The versions a resource had before it was replaced in place (a person's edit of
-- demographics, a newer upstream version, a review resolved): nothing is lost.
-- body = the sealed FHIR JSON (label 'resource_history').
CREATE TABLE resource_history (
    id          INTEGER PRIMARY KEY,
    resource_id INTEGER NOT NULL REFERENCES resources (id),
    replaced_at TEXT NOT NULL,
    replaced_by TEXT NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('local-edit', 'pulled', 'review')),
    body        BLOB NOT NULL
);
CREATE INDEX resource_history_by_resource ON resource_history (resource_id, id);

-- Incremental pull: per upstream and stream ('Appointment', 'Observation Patient/<id>'), the
-- newest upstream meta.lastUpdated taken (as the server wrote it) and the upstream ids taken
-- at exactly that instant (JSON list), so a page boundary inside a run of equal timestamps
-- neither loses nor repeats anything. Written in the transaction that stores the page.
CREATE TABLE pull_cursors (
    upstream   TEXT NOT NULL,
    stream     TEXT NOT NULL,
    since      TEXT,
    seen       TEXT NOT NULL DEFAULT '[]',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (upstream, stream)
) WITHOUT ROWID;

-- Local edits the upstream refused because it changed meanwhile (412): held for a nurse,
-- never overwritten either way without one. mine = our version, theirs = the upstream's
-- current version (both sealed: labels 'review_queue.mine' and 'review_queue.theirs').
CREATE TABLE review_queue (
    id             INTEGER PRIMARY KEY,
    resource_id    INTEGER NOT NULL REFERENCES resources (id),
    outbox_id      INTEGER REFERENCES outbox (id),
    upstream_ref   TEXT NOT NULL,
    base_version   TEXT,
    theirs_version TEXT,
    theirs_updated TEXT,
    created_at     TEXT NOT NULL,
    state          TEXT NOT NULL DEFAULT 'open'
                   CHECK (state IN ('open', 'kept-mine', 'took-theirs')),
    resolved_by    TEXT,
    resolved_at    TEXT,
    mine           BLOB NOT NULL,
    theirs         BLOB NOT NULL
);
CREATE INDEX review_queue_open ON review_queue (created_at) WHERE state = 'open';
CREATE UNIQUE INDEX review_queue_one_open ON review_queue (resource_id) WHERE state = 'open';

-- "Which local resource was delivered as Patient/<id>?" is asked for every reference in a
-- pulled page; without this it scans the whole outbox.
CREATE INDEX outbox_by_upstream_ref ON outbox (upstream_ref) WHERE upstream_ref IS NOT NULL;
