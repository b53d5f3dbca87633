-- Single-visit links for remote providers (issue 6, provider view). No column here is PHI:
-- local logical ids, times, hashes, staff actors and a claim outcome word.

-- One link = one visit: the SHA-256 of the random token in the link (the token itself is
-- never stored), the arrival Encounter it opens, when it stops working, the browser that
-- first used it (SHA-256 of that browser's cookie), and how it ended.
CREATE TABLE visit_links (
    id                    INTEGER PRIMARY KEY,
    token_hash            BLOB NOT NULL UNIQUE,
    encounter_id          TEXT NOT NULL,
    patient_id            TEXT NOT NULL,
    provider_name         TEXT NOT NULL DEFAULT '',
    issued_by             TEXT NOT NULL,
    issued_at             TEXT NOT NULL,
    expires_at            TEXT NOT NULL,
    browser_hash          BLOB,
    bound_at              TEXT,
    revoked_at            TEXT,
    revoked_by            TEXT,
    completed_at          TEXT,
    finished_encounter_id TEXT,
    note_id               TEXT,
    claim_outcome         TEXT
);
CREATE INDEX visit_links_by_encounter ON visit_links (encounter_id);
