-- Devices, stations and the routing of readings to charts (issue 3).
-- None of these columns is PHI except unmatched_readings.payload, which is sealed
-- (AES-256-GCM under the data key, bound to the row; re-sealed on data-key rotation).

-- Where devices sit: a kiosk or an exam room. A reading from a station's device goes to the
-- patient checked in at that station at the moment it was taken.
CREATE TABLE stations (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('kiosk', 'exam-room')),
    created_at TEXT NOT NULL
) WITHOUT ROWID;

-- Registered devices. A clinic device is assigned to a station; a home device to a patient
-- (patient_id: our logical id, a random UUID, not PHI by itself). Device Information and
-- battery are refreshed on every connection; last_sequence is the glucose meter's highest
-- stored record already in the store, written in the same transaction as its readings.
CREATE TABLE devices (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    transport         TEXT NOT NULL CHECK (transport IN ('ble', 'serial', 'simulated', 'hub')),
    profile           TEXT NOT NULL,
    address           TEXT,
    setting           TEXT NOT NULL CHECK (setting IN ('clinic', 'home')),
    station_id        TEXT REFERENCES stations (id),
    patient_id        TEXT,
    requires_bonding  INTEGER NOT NULL DEFAULT 0,
    manufacturer      TEXT,
    model             TEXT,
    serial_number     TEXT,
    firmware_revision TEXT,
    battery_percent   INTEGER,
    fhir_device_id    TEXT,
    last_sequence     INTEGER,
    last_seen         TEXT,
    registered_at     TEXT NOT NULL,
    retired_at        TEXT
) WITHOUT ROWID;

-- Who is at which station. A station holds one patient at a time: checking a new patient in
-- closes the previous check-in. checked_out_at NULL = still there.
CREATE TABLE station_checkins (
    id             INTEGER PRIMARY KEY,
    station_id     TEXT NOT NULL REFERENCES stations (id),
    patient_id     TEXT NOT NULL,
    checked_in_at  TEXT NOT NULL,
    checked_out_at TEXT,
    actor          TEXT NOT NULL
);
CREATE INDEX station_checkins_by_station ON station_checkins (station_id, checked_in_at);

-- Readings that could not be matched to a patient with certainty: held for a nurse, never
-- dropped and never guessed. payload = the sealed FHIR Observations (without a subject).
CREATE TABLE unmatched_readings (
    id          INTEGER PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices (id),
    station_id  TEXT,
    received_at TEXT NOT NULL,
    measured_at TEXT,
    summary     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'assigned', 'discarded')),
    resolved_by TEXT,
    resolved_at TEXT,
    patient_id  TEXT,
    note        TEXT
);
CREATE INDEX unmatched_pending ON unmatched_readings (received_at) WHERE state = 'pending';
