-- 0013_batch_dependencies: a batch may wait for others ("summarise after all
-- seven extractions"). POST /v1/batches takes `after` (batch ids of the same
-- tenant, which must exist: the graph can only point at older batches, so it
-- has no cycles) and `after_policy`. Until its dependencies allow it the batch is
-- 'waiting' (not claimable: claims take queued and running batches only); the
-- transaction that makes its last dependency terminal releases it to 'queued' or,
-- when the policy forbids that ending, cancels it (stop_reason 'dependency') and
-- its own waiting dependents with it. The database does it (_settle_batches), so
-- it survives restarts and holds across daemons; polling from a client did not.
--
-- after_ids keeps the request's list for the batch's JSON; batch_dependencies is
-- the same edges indexed by dependency, which is how a finishing batch finds the
-- batches waiting for it. waiting is the status rule's input, like paused: true
-- while some dependency has not ended, cleared when the batch is released or
-- ends.
ALTER TABLE @schema.batches
    ADD COLUMN after_ids uuid[],
    ADD COLUMN after_policy text,
    ADD COLUMN waiting boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT batch_after_policy_known CHECK (after_policy IN ('completed', 'terminal')),
    DROP CONSTRAINT batch_status_known,
    ADD CONSTRAINT batch_status_known CHECK (status IN ('waiting', 'queued', 'running',
        'paused', 'cancelling', 'completed', 'completed_with_errors', 'failed', 'cancelled'));

-- Both ends cascade: a batch is deleted only once terminal, and a dependency is
-- evaluated when it becomes terminal, so no waiting batch loses an edge it needs.
CREATE TABLE @schema.batch_dependencies (
    batch_id    uuid NOT NULL REFERENCES @schema.batches (id) ON DELETE CASCADE,
    depends_on  uuid NOT NULL REFERENCES @schema.batches (id) ON DELETE CASCADE,
    PRIMARY KEY (batch_id, depends_on)
);
CREATE INDEX batch_dependencies_dependents ON @schema.batch_dependencies (depends_on);

-- _batch_status takes the waiting flag: the old signature goes, and the new one is
-- applied from functions/ after the migrations. Only functions call it, and they
-- are all replaced in this transaction (as in 0007).
DROP FUNCTION IF EXISTS @schema._batch_status(boolean, integer, integer, integer, integer,
                                              integer, text, boolean);
