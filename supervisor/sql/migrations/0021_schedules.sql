-- 0021_schedules: batches submitted on a cron schedule ([schedules.NAME] in the
-- configuration). The definitions stay in the configuration; the database holds
-- what every daemon must agree on: whether a schedule is paused, from when its
-- slots count, and which slots have been fired.
--
-- A slot is fired by the one transaction that inserts its schedule_runs row and
-- its batch together (claim_schedule_slot, then the submission): of N daemons
-- that try the same slot, one commits; the others find it taken. The unique
-- index over (schedule, slot_at) is what guarantees it; manual runs ("run now")
-- are outside the slot sequence and not in it.
CREATE TABLE @schema.schedules (
    name       text PRIMARY KEY,
    paused     boolean NOT NULL DEFAULT false,
    -- slots after this are due: when a daemon first saw the schedule, or when
    -- it was last resumed (slots passed while paused never fire)
    since      timestamptz NOT NULL DEFAULT now(),
    paused_at  timestamptz,
    paused_by  text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE @schema.schedule_runs (
    id         bigserial PRIMARY KEY,
    schedule   text NOT NULL REFERENCES @schema.schedules (name) ON DELETE CASCADE,
    slot_at    timestamptz NOT NULL,  -- the slot's time; a manual run's request time
    kind       text NOT NULL CONSTRAINT schedule_run_kind_known
        CHECK (kind IN ('scheduled', 'catch_up', 'manual')),
    -- created: batch_id is its batch (NULL once retention deleted it); skipped:
    -- the previous run still held the key (overlap = skip); missed: no daemon ran
    -- in time (catch_up = skip); failed: items_from raised or returned bad items
    outcome    text NOT NULL CONSTRAINT schedule_run_outcome_known
        CHECK (outcome IN ('created', 'skipped', 'missed', 'failed')),
    -- Deferred: the run is inserted first in the transaction that then inserts
    -- its batch, so the slot is taken before any other work is done.
    batch_id   uuid REFERENCES @schema.batches (id) ON DELETE SET NULL
        DEFERRABLE INITIALLY DEFERRED,
    detail     text,
    worker     text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX schedule_runs_slot ON @schema.schedule_runs (schedule, slot_at)
    WHERE kind <> 'manual';
CREATE INDEX schedule_runs_manual ON @schema.schedule_runs (schedule, id) WHERE kind = 'manual';
CREATE INDEX schedule_runs_batch ON @schema.schedule_runs (batch_id) WHERE batch_id IS NOT NULL;
