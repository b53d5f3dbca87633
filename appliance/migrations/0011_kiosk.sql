-- Kiosk screens bound to stations (issue 6). No column here is PHI.

-- One-time pairing codes an admin issues for a station; only the SHA-256 of the code is kept.
-- A code is good once, for a few minutes.
CREATE TABLE kiosk_pairings (
    code_hash  BLOB PRIMARY KEY,
    station_id TEXT NOT NULL REFERENCES stations (id),
    issued_by  TEXT NOT NULL,
    issued_at  TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at    TEXT
) WITHOUT ROWID;

-- A paired kiosk browser: the SHA-256 of the long-lived token in its cookie (path /kiosk),
-- the station it stands at, and who paired it. revoked_at set: the cookie is worthless.
CREATE TABLE kiosks (
    id         INTEGER PRIMARY KEY,
    token_hash BLOB NOT NULL UNIQUE,
    station_id TEXT NOT NULL REFERENCES stations (id),
    paired_by  TEXT NOT NULL,
    paired_at  TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX kiosks_by_station ON kiosks (station_id);
