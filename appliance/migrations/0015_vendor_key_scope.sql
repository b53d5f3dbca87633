-- What an API key of vendor_keys may do (docs/fhir-api.md): 'ingest', a device vendor's hub
-- posting readings (web/ingest.py; every key issued before this migration), or 'read', a
-- local integration (the clinic's own scripts, a local EHR interface) reading and searching
-- under /fhir/ (web/fhir_api.py). One scope per key: an ingest key cannot read, a read key
-- cannot post readings.
ALTER TABLE vendor_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'ingest'
    CHECK (scope IN ('ingest', 'read'));
