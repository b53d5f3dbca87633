-- Exam cameras shown live in a video visit (issue 7, item 5): the devices process, which owns
-- the camera, publishes it as its own WebRTC participant; the web process's video service
-- answers. The offer and the answer cross here, in the store, the bus between the two
-- processes (DESIGN.md, "Processes"; services/video/camera_streams.py, docs/video.md).
-- No column is PHI: local ids, a configured camera name, a staff actor, times, a state word,
-- session descriptions (loopback/host addresses, ICE credentials and DTLS fingerprints of
-- connections that live as long as the stream; cleared when it ends) and a device error.

-- One row per "Show <camera> in the visit". The web process inserts it 'pending'; the devices
-- process claims it ('claimed'), opens the camera and writes its offer ('offered'); the web
-- process answers ('live', participant_id: the camera in the room). While live, the devices
-- process stamps alive_at every second; a stamp older than a few seconds means it died. The
-- nurse's stop, the visit's end or the devices process going make it 'stopping' / 'stopped'
-- / 'failed'; a request nobody claimed in time ends 'expired' and is never taken later.
CREATE TABLE camera_streams (
    id             INTEGER PRIMARY KEY,
    camera         TEXT NOT NULL,
    encounter_id   TEXT NOT NULL,
    requested_by   TEXT NOT NULL,
    requested_at   TEXT NOT NULL,
    state          TEXT NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'claimed', 'offered', 'live', 'stopping',
                                    'stopped', 'failed', 'expired')),
    claimed_by     TEXT,
    claimed_at     TEXT,
    offer          TEXT,
    answer         TEXT,
    participant_id TEXT,
    alive_at       TEXT,
    finished_at    TEXT,
    error          TEXT
);
-- Both processes look for open streams a few times a second: only those are indexed.
CREATE INDEX camera_streams_open ON camera_streams (state, id)
    WHERE state IN ('pending', 'claimed', 'offered', 'live', 'stopping');
