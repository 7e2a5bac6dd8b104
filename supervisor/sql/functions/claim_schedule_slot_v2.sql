-- claim_schedule_slot_v2: claim_schedule_slot with the pipeline run a slot of a
-- pipeline schedule creates (p_pipeline_run; NULL for a batch schedule's runs).
-- The answers and the rules are claim_schedule_slot's: 'claimed' when the run's
-- row was inserted, 'taken' when this slot (or a later one) already has a run or
-- the slot is not after the schedule's `since`, 'paused' for a slot of a paused
-- schedule, 'unknown' when the schedule has no row. Manual runs (p_kind
-- 'manual') are outside the slot sequence: neither paused nor taken applies.
--
-- The schedule's row is locked first, so the runs of one schedule are claimed
-- one at a time, and the check below (a statement of its own, so it sees the
-- run a concurrent claim committed while we waited) keeps slots monotonic. The
-- unique index schedule_runs_slot backs this up. Called first in the
-- transaction that inserts the run's batch or pipeline run (deferred foreign
-- keys): the slot and what it fired commit together or not at all.
CREATE OR REPLACE FUNCTION @schema.claim_schedule_slot_v2(
    p_schedule text, p_slot_at timestamptz, p_kind text, p_outcome text, p_batch uuid,
    p_pipeline_run uuid, p_detail text, p_worker text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    s @schema.schedules%ROWTYPE;
BEGIN
    SELECT * INTO s FROM @schema.schedules WHERE name = p_schedule FOR UPDATE;
    IF NOT FOUND THEN RETURN 'unknown'; END IF;
    IF p_kind <> 'manual' THEN
        IF s.paused THEN RETURN 'paused'; END IF;
        IF p_slot_at <= s.since OR EXISTS (
            SELECT 1 FROM @schema.schedule_runs
             WHERE schedule = p_schedule AND kind <> 'manual' AND slot_at >= p_slot_at) THEN
            RETURN 'taken';
        END IF;
    END IF;
    INSERT INTO @schema.schedule_runs (schedule, slot_at, kind, outcome, batch_id,
                                       pipeline_run_id, detail, worker)
    VALUES (p_schedule, COALESCE(p_slot_at, now()), p_kind, p_outcome, p_batch, p_pipeline_run,
            p_detail, p_worker)
    ON CONFLICT DO NOTHING;
    RETURN CASE WHEN FOUND THEN 'claimed' ELSE 'taken' END;
END
$$;
