-- 0027_schedule_pipeline_runs: a schedule can fire a pipeline run instead of a
-- batch ([schedules.NAME] pipeline = "..."). The slot's row names the run it
-- created, inserted in the same transaction as the run (claim_schedule_slot_v2
-- first, then the run and its first stage's batch), so the run and its slot
-- commit together or not at all, exactly as a batch and its slot do. Deferred
-- for the same reason as batch_id: the slot is taken before the run exists.
ALTER TABLE @schema.schedule_runs
    ADD COLUMN pipeline_run_id uuid REFERENCES @schema.pipeline_runs (id) ON DELETE SET NULL
        DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT schedule_run_one_target CHECK (batch_id IS NULL OR pipeline_run_id IS NULL);
CREATE INDEX schedule_runs_pipeline_run ON @schema.schedule_runs (pipeline_run_id)
    WHERE pipeline_run_id IS NOT NULL;
