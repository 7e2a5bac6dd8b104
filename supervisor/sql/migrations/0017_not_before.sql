-- 0017_not_before: delayed batches. POST /v1/batches takes `not_before`; until
-- then the batch is 'scheduled': not claimable (claims take queued and running
-- batches only, so a scheduled batch costs a claim nothing) and its items'
-- run_after is not_before, so the claim's own run_after check holds the line too.
-- `scheduled` is the status rule's input, like waiting and paused: set at
-- submission when not_before is in the future (the database clock), cleared by
-- promote_scheduled (run by every daemon's scheduler when the time comes,
-- set-based, SKIP LOCKED, idempotent), by PATCH and when the batch ends.
-- not_before keeps the time asked for, for the batch's JSON.
ALTER TABLE @schema.batches
    ADD COLUMN not_before timestamptz,
    ADD COLUMN scheduled boolean NOT NULL DEFAULT false,
    DROP CONSTRAINT batch_status_known,
    ADD CONSTRAINT batch_status_known CHECK (status IN ('waiting', 'scheduled', 'queued',
        'running', 'paused', 'cancelling', 'completed', 'completed_with_errors', 'failed',
        'cancelled'));

-- The scheduler's one question: which scheduled batch is due next. Empty unless
-- batches are scheduled (every existing row has scheduled = false).
CREATE INDEX batches_scheduled ON @schema.batches (not_before) WHERE scheduled;

-- _batch_status takes the scheduled flag: the old signature goes, and the new one
-- is applied from functions/ after the migrations. Only functions call it, and
-- they are all replaced in this transaction (as in 0007 and 0013).
DROP FUNCTION IF EXISTS @schema._batch_status(boolean, boolean, integer, integer, integer,
                                              integer, integer, text, boolean);
