-- Originating-site facility-fee claims, Q3014 (issue 8; docs/adr/0006-claims.md).
-- A claim's content (patient, MBI, diagnoses, parties) is a FHIR Claim in `resources`,
-- encrypted and re-encrypted on key rotation like every resource; it is written without an
-- outbox row (a draft must never leave the box): submission adds the claims-lane row.
-- The plain columns here hold no PHI: local ids (random UUIDs), dates, codes, amounts in
-- cents, states, and check messages in our own words (they never quote a value).

CREATE TABLE claims (
    id            INTEGER PRIMARY KEY,
    claim_number  TEXT NOT NULL UNIQUE,          -- CLM01 (patient control number)
    resource_id   INTEGER NOT NULL REFERENCES resources (id),  -- the current FHIR Claim
    encounter_id  TEXT NOT NULL,
    patient_id    TEXT NOT NULL,
    site_id       TEXT NOT NULL,
    service_date  TEXT NOT NULL,                 -- YYYY-MM-DD, site's time zone
    form          TEXT NOT NULL CHECK (form IN ('837P', '837I')),
    payer_id      TEXT NOT NULL,
    payer_kind    TEXT NOT NULL CHECK (payer_kind IN ('medicare', 'medicaid', 'commercial')),
    charge_cents  INTEGER NOT NULL CHECK (charge_cents > 0),
    fee_cents     INTEGER NOT NULL CHECK (fee_cents > 0),
    status        TEXT NOT NULL CHECK (status IN ('draft', 'ready', 'submitted', 'in_review',
                  'acknowledged', 'accepted', 'rejected', 'paid', 'denied', 'cancelled')),
    problems      TEXT NOT NULL DEFAULT '[]',    -- JSON [{code, message}] of the last check
    checked_at    TEXT,
    x12_valid     INTEGER,                       -- pyx12's verdict at the last check
    override_by   TEXT,                          -- who allowed a second Q3014 that day
    override_at   TEXT,                          -- (the reason is inside the FHIR Claim)
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
-- One Q3014 per patient per date of service per site, unless a person overrode it.
CREATE UNIQUE INDEX claims_one_per_day ON claims (patient_id, service_date, site_id)
    WHERE override_at IS NULL AND status != 'cancelled';
CREATE UNIQUE INDEX claims_one_per_encounter ON claims (encounter_id) WHERE status != 'cancelled';
CREATE INDEX claims_by_status ON claims (status, service_date);

-- Every change of a claim's state, with who made it.
CREATE TABLE claim_events (
    id          INTEGER PRIMARY KEY,
    claim_id    INTEGER NOT NULL REFERENCES claims (id),
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX claim_events_by_claim ON claim_events (claim_id, id);

-- What the trigger decided for each finished encounter, drafted or not, and why: the scan
-- after a restart skips what is here, and "why was this visit not billed" is a query.
CREATE TABLE claim_decisions (
    encounter_id TEXT PRIMARY KEY,
    patient_id   TEXT,
    service_date TEXT,
    site_id      TEXT NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('drafted', 'not-eligible', 'not-at-site',
                 'duplicate', 'not-telehealth')),
    reason       TEXT NOT NULL,
    claim_id     INTEGER REFERENCES claims (id),
    decided_at   TEXT NOT NULL,
    decided_by   TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX claim_decisions_by_outcome ON claim_decisions (outcome, service_date);

-- Interchanges made (exported or, later, submitted): control numbers are never reused.
-- The X12 text is not kept: it is rebuilt byte for byte from the FHIR Claims named in
-- claim_batch_items and this row (control numbers, creation time).
CREATE TABLE claim_batches (
    id                  INTEGER PRIMARY KEY,
    interchange_control INTEGER NOT NULL UNIQUE CHECK (interchange_control BETWEEN 1 AND 999999999),
    group_control       INTEGER NOT NULL UNIQUE,
    form                TEXT NOT NULL CHECK (form IN ('837P', '837I')),
    usage               TEXT NOT NULL CHECK (usage IN ('T', 'P')),
    purpose             TEXT NOT NULL CHECK (purpose IN ('export', 'submission')),
    created_at          TEXT NOT NULL,           -- site-local ISO time (ISA09/ISA10, GS04/GS05)
    created_by          TEXT NOT NULL,
    claim_count         INTEGER NOT NULL
);
CREATE TABLE claim_batch_items (
    batch_id    INTEGER NOT NULL REFERENCES claim_batches (id),
    claim_id    INTEGER NOT NULL REFERENCES claims (id),
    resource_id INTEGER NOT NULL REFERENCES resources (id),
    st_control  INTEGER NOT NULL UNIQUE,         -- ST02, unique across all interchanges
    PRIMARY KEY (batch_id, claim_id)
) WITHOUT ROWID;
CREATE INDEX claim_batch_items_by_claim ON claim_batch_items (claim_id);

-- The last control numbers handed out ('isa', 'gs', 'st'): taken in the transaction that
-- records the batch, so they only ever go up.
CREATE TABLE claim_control_numbers (
    name  TEXT PRIMARY KEY CHECK (name IN ('isa', 'gs', 'st')),
    value INTEGER NOT NULL
) WITHOUT ROWID;
