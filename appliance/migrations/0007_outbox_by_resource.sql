-- The sync agent asks "is this Patient (or Device) delivered, and where?" for every new
-- patient a bundle's readings point at: resources by logical id, then their outbox row.
-- Without this index that second step scans the whole outbox once per patient.
CREATE INDEX outbox_by_resource ON outbox (resource_id);
