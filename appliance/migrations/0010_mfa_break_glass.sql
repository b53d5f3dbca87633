-- Issue 6, nurse console security: TOTP second factor, recovery codes, the pre-MFA login
-- step, forced password change, and break-glass (emergency access) grants.

-- Set by an administrator's create or reset: the person must choose their own password
-- before anything else.
ALTER TABLE users ADD COLUMN must_change_password INTEGER NOT NULL DEFAULT 0;

-- One TOTP secret per account. secret = Keyring.seal(label 'mfa_totp.secret', row =
-- user_id): never stored in clear, re-sealed by key rotation (key_rotation.SEALED_COLUMNS).
-- confirmed_at NULL = enrolment started, not yet proven with a code. last_step = the newest
-- RFC 6238 time step accepted, so a code is never accepted twice (replay).
CREATE TABLE mfa_totp (
    user_id      INTEGER PRIMARY KEY REFERENCES users (id),
    secret       BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    confirmed_at TEXT,
    last_step    INTEGER NOT NULL DEFAULT 0
);

-- Single-use recovery codes: salted SHA-256 of an 80-bit code (ASVS 4.0.3 V2.6.2).
CREATE TABLE mfa_recovery_codes (
    id        INTEGER PRIMARY KEY,
    user_id   INTEGER NOT NULL REFERENCES users (id),
    salt      BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    used_at   TEXT
);
CREATE INDEX mfa_recovery_codes_by_user ON mfa_recovery_codes (user_id);

-- The state between a correct password and the second factor (or a forced enrolment). It
-- is not a session: nothing but the MFA pages accepts it. Token stored as its SHA-256.
CREATE TABLE mfa_challenges (
    token_hash BLOB PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    purpose    TEXT NOT NULL CHECK (purpose IN ('verify', 'enrol')),
    csrf       TEXT NOT NULL,
    next_path  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Break-glass grants (HIPAA 164.312(a)(2)(ii), ONC 170.315(d)(6)): who opened which
-- patient's record outside normal access, why, until when. reason = Keyring.seal(label
-- 'break_glass.reason', row = id): free text may name clinical facts.
CREATE TABLE break_glass (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users (id),
    patient_id  TEXT NOT NULL,
    patient_key BLOB NOT NULL,
    category    TEXT NOT NULL,
    reason      BLOB NOT NULL,
    granted_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    ended_at    TEXT
);
CREATE INDEX break_glass_by_user ON break_glass (user_id, expires_at);
CREATE INDEX break_glass_by_time ON break_glass (granted_at);
