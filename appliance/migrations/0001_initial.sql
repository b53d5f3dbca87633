-- Initial schema. Every PHI-bearing column is AES-256-GCM ciphertext (see appliance/keys.py);
-- the plain columns are the non-PHI index columns the issue allows: type, code, date and a
-- pseudonymous patient key (keyed HMAC, never reversible without the blind-index key).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- Data keys, wrapped by the key-encryption key (which never touches the database).
CREATE TABLE data_keys (
    version    INTEGER PRIMARY KEY,
    purpose    TEXT NOT NULL CHECK (purpose IN ('data', 'blind', 'signing')),
    state      TEXT NOT NULL CHECK (state IN ('active', 'decrypt_only', 'retired')),
    wrapped    BLOB NOT NULL,
    created_at TEXT NOT NULL
);

-- FHIR resources. logical_id is a time-ordered UUID (v7 layout) so its index grows at the
-- right edge like the rowid does; body is nonce || ciphertext || tag bound to
-- ('resources', logical_id, key_version) as associated data.
CREATE TABLE resources (
    id          INTEGER PRIMARY KEY,
    logical_id  TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    patient_key BLOB,
    code        TEXT,
    effective   TEXT,
    key_version INTEGER NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX resources_by_patient ON resources (patient_key, type, effective);

-- Blind indexes for PHI look-ups (name + birth date, identifiers): keyed HMAC digests.
CREATE TABLE blind_index (
    kind        TEXT NOT NULL,
    digest      BLOB NOT NULL,
    resource_id INTEGER NOT NULL REFERENCES resources (id),
    PRIMARY KEY (kind, digest, resource_id)
) WITHOUT ROWID;

-- The outbox: one row per change that must leave the box, written in the same transaction
-- as the change. The row's identity for idempotent delivery is the resource's logical_id
-- (sent as identifier urn:ietf:rfc:3986|urn:uuid:<logical_id>). Delivery state and the
-- upstream's error are separate columns (as Medplum's agent queue keeps them).
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    lane            INTEGER NOT NULL,
    resource_id     INTEGER NOT NULL REFERENCES resources (id),
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    last_error      TEXT,
    upstream_ref    TEXT,
    delivered_at    TEXT
);
CREATE INDEX outbox_pending ON outbox (lane, id) WHERE state = 'pending';

-- The audit chain. hash = SHA-256(prev_hash || canonical record); see appliance/audit.py.
CREATE TABLE audit (
    id          INTEGER PRIMARY KEY,
    ts          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    patient_key BLOB,
    entity      TEXT,
    detail      TEXT,
    prev_hash   BLOB NOT NULL,
    hash        BLOB NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;

-- Signed checkpoints over the chain head (Ed25519, the box's signing key).
CREATE TABLE audit_checkpoints (
    id        INTEGER PRIMARY KEY,
    audit_id  INTEGER NOT NULL,
    hash      BLOB NOT NULL,
    ts        TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;

-- Liveness of each process (web, devices, sync), written by the process itself; /healthz
-- reads it. The store is the bus (DESIGN.md), so this works under systemd and the supervisor.
CREATE TABLE heartbeats (
    process    TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    beat_at    TEXT NOT NULL,
    status     TEXT NOT NULL
) WITHOUT ROWID;

-- Staff accounts and server-side sessions for the web UI.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL CHECK (role IN ('nurse', 'provider', 'admin')),
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
);
CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    csrf       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    seen_at    TEXT NOT NULL
) WITHOUT ROWID;
