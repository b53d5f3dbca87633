-- Outbox rows are either creates (POST with ifNoneExist: the default, every row so far) or
-- version-checked updates (PUT with If-Match: a local edit of a resource that came from or
-- went to the upstream). The batch deliverer sends creates; updates go one by one, because
-- each needs its own precondition and a 412 must reach a person (issue 5).
ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'create'
    CHECK (kind IN ('create', 'update'));
ALTER TABLE outbox ADD COLUMN if_match TEXT;
