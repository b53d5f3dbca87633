-- Stored copies that failed authentication (a ciphertext altered or moved on disk, a bad
-- sector) and were then replaced by an authenticated copy pulled from the upstream
-- (store._import). Kept exactly as found, for whoever investigates: still ciphertext, never
-- decrypted, never sent, and not re-encrypted by key rotation (it does not open).
-- docs/troubleshooting.md.
CREATE TABLE unreadable_copies (
    id          INTEGER PRIMARY KEY,
    resource_id INTEGER NOT NULL REFERENCES resources (id),
    key_version INTEGER NOT NULL,
    body        BLOB NOT NULL,
    found_at    TEXT NOT NULL,
    replaced_by TEXT NOT NULL  -- the upstream reference whose copy took its place
);
