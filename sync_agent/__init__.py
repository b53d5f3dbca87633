"""The sync agent: outbox delivery to upstream FHIR servers and pull-down."""
