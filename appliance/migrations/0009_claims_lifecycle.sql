-- The claims lifecycle (issue 8; docs/adr/0006-claims.md, "Lifecycle"): submission intents,
-- acknowledgements and remittances. No PHI here either: local ids, control numbers, codes,
-- cents, states, and messages in our own words (they never quote a value of the claim).

-- A submission intent. A claim is "sending" while this names a batch whose request may be
-- on the wire: it is written, with the batch row, BEFORE the request goes out, so a crash or
-- a lost answer can never lead to a blind second submission.
ALTER TABLE claims ADD COLUMN sending_batch INTEGER REFERENCES claim_batches (id);

-- What became of a submission batch (NULL for an export).
--   sending   the intent is written; the request may be on the wire
--   sent      the clearinghouse/payer answered 2xx: the interchange was received
--   not_sent  the connection was refused before anything was sent: claims stayed ready
--   ambiguous no clear answer (timeout after sending, reset, 5xx without a body, or the
--             process died while sending): claims went to in_review for a person
--   refused   a clear 4xx refusal of the whole interchange
ALTER TABLE claim_batches ADD COLUMN state TEXT
    CHECK (state IS NULL OR state IN ('sending', 'sent', 'not_sent', 'ambiguous', 'refused'));
ALTER TABLE claim_batches ADD COLUMN endpoint_kind TEXT CHECK (endpoint_kind IN ('x12', 'fhir'));
ALTER TABLE claim_batches ADD COLUMN answered_at TEXT;
ALTER TABLE claim_batches ADD COLUMN outcome TEXT;   -- plain words: HTTP status, failure class
CREATE INDEX claim_batches_sending ON claim_batches (state) WHERE state = 'sending';
CREATE INDEX claims_sending ON claims (sending_batch) WHERE sending_batch IS NOT NULL;

-- Every message the clearinghouse or payer sent about a claim, in plain words (999 IK3/IK4
-- segment and element errors, 277CA STC statuses, 835 adjustment reasons, submission
-- outcomes). Codes are the X12 code values; messages are our translations.
CREATE TABLE claim_messages (
    id        INTEGER PRIMARY KEY,
    claim_id  INTEGER NOT NULL REFERENCES claims (id),
    at        TEXT NOT NULL,
    source    TEXT NOT NULL CHECK (source IN ('999', '277CA', '835', 'submission')),
    code      TEXT,
    message   TEXT NOT NULL,
    response  INTEGER REFERENCES claim_responses (id)
);
CREATE INDEX claim_messages_by_claim ON claim_messages (claim_id, id);

-- What the payer paid (835 CLP), reconciled: billed = paid + patient share + other
-- adjustments; allowed = paid + patient share. Adjustments: JSON [{group, reason, cents}].
CREATE TABLE claim_payments (
    id              INTEGER PRIMARY KEY,
    claim_id        INTEGER NOT NULL REFERENCES claims (id),
    at              TEXT NOT NULL,
    status_code     TEXT NOT NULL,               -- CLP02
    billed_cents    INTEGER NOT NULL,
    allowed_cents   INTEGER NOT NULL,
    paid_cents      INTEGER NOT NULL,
    patient_cents   INTEGER NOT NULL,
    adjustments     TEXT NOT NULL DEFAULT '[]',
    payer_claim_id  TEXT,                        -- CLP07, the payer's control number
    response        INTEGER REFERENCES claim_responses (id)
);
CREATE INDEX claim_payments_by_claim ON claim_payments (claim_id);

-- Acknowledgement and remittance files received (polled or imported by hand): a file is
-- applied once (its digest is unique), in one transaction with everything it changes.
CREATE TABLE claim_responses (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('999', '277CA', '835')),
    digest       TEXT NOT NULL UNIQUE,           -- sha-256 of the file's bytes
    control      TEXT NOT NULL,                  -- its ISA13
    received_at  TEXT NOT NULL,
    received_by  TEXT NOT NULL,                  -- 'sync:poll' or 'cli:<user>'
    summary      TEXT NOT NULL                   -- counts in plain words
);
