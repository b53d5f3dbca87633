-- Exam-camera stills asked of the devices process by the web process (issue 7, item 5): the
-- store is the bus between them (DESIGN.md, "Processes"; services/video/still_requests.py).
-- No column here is PHI: local logical ids, a configured camera name, staff actors, times,
-- a state word and a device error (the device's path and libav's words).

-- One row per still a nurse asked for. The web process inserts it 'pending' and waits; the
-- devices process claims it ('claimed', one worker only), takes the still and ends it 'done'
-- (media_id: the stored Media) or 'failed' (error). A request nobody claimed in time ends
-- 'expired' and is never taken later.
CREATE TABLE camera_requests (
    id           INTEGER PRIMARY KEY,
    camera       TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    encounter_id TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'claimed', 'done', 'failed', 'expired')),
    claimed_by   TEXT,
    claimed_at   TEXT,
    finished_at  TEXT,
    media_id     TEXT,
    error        TEXT
);
-- The devices process looks for open requests a few times a second: only those are indexed.
CREATE INDEX camera_requests_open ON camera_requests (state, id)
    WHERE state IN ('pending', 'claimed');
