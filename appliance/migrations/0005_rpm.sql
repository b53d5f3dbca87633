-- Remote patient monitoring (issue 4): enrolment, per-patient thresholds, alerts with their
-- history, staff time logs and device-vendor API keys. Patients appear by their local
-- logical id (a random UUID); free text a person writes is sealed (Keyring.seal) like other
-- PHI, and listed in appliance/key_rotation.py SEALED_COLUMNS.

-- Who is enrolled, in which program (the program gives the default thresholds).
CREATE TABLE rpm_enrollment (
    patient_id           TEXT PRIMARY KEY,
    program              TEXT NOT NULL,
    chronic_lung_disease INTEGER NOT NULL DEFAULT 0,
    enrolled_at          TEXT NOT NULL,
    enrolled_by          TEXT NOT NULL,
    ended_at             TEXT
) WITHOUT ROWID;

-- A patient's own threshold for one rule, overriding the program default (JSON parameters).
CREATE TABLE rpm_thresholds (
    patient_id TEXT NOT NULL,
    rule       TEXT NOT NULL,
    params     TEXT NOT NULL,
    set_by     TEXT NOT NULL,
    set_at     TEXT NOT NULL,
    PRIMARY KEY (patient_id, rule)
) WITHOUT ROWID;

-- Alerts: at most one not-resolved alert per patient and rule (worsening raises severity).
CREATE TABLE alerts (
    id             INTEGER PRIMARY KEY,
    patient_id     TEXT NOT NULL,
    rule           TEXT NOT NULL,
    severity       TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'snoozed', 'resolved')),
    opened_at      TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    trigger_ref    TEXT,
    detail         BLOB,
    acked_by       TEXT,
    acked_at       TEXT,
    snoozed_until  TEXT,
    escalated_at   TEXT,
    escalated_to   TEXT,
    resolved_at    TEXT,
    resolved_by    TEXT,
    resolution     TEXT,
    note           BLOB,
    fhir_id        TEXT
);
CREATE UNIQUE INDEX alerts_one_live ON alerts (patient_id, rule) WHERE state != 'resolved';
CREATE INDEX alerts_live ON alerts (state, severity, opened_at) WHERE state != 'resolved';

-- Every change of an alert (opened, raised, acknowledged, snoozed, escalated, cleared...).
CREATE TABLE alert_events (
    id       INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts (id),
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    severity TEXT
);

-- Staff time spent managing a patient's monitoring (99457/99458/99470).
CREATE TABLE rpm_time_log (
    id          INTEGER PRIMARY KEY,
    patient_id  TEXT NOT NULL,
    staff       TEXT NOT NULL,
    performed_on TEXT NOT NULL,
    minutes     INTEGER NOT NULL CHECK (minutes > 0 AND minutes <= 600),
    interactive INTEGER NOT NULL DEFAULT 0,
    note        BLOB,
    logged_at   TEXT NOT NULL
);
CREATE INDEX rpm_time_log_by_patient ON rpm_time_log (patient_id, performed_on);

-- Device vendors (cellular RPM hubs) posting to the ingest endpoint: one key each, stored
-- as a hash only; a disabled key is refused.
CREATE TABLE vendor_keys (
    vendor      TEXT PRIMARY KEY,
    key_hash    BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    disabled_at TEXT
) WITHOUT ROWID;
