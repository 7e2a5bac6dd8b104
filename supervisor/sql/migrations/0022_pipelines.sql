-- 0022_pipelines: multi-stage runs. A pipeline (named in the daemons' config) is
-- a sequence of stages, each a batch of one handler. A run is one row here; its
-- stages are rows of pipeline_stages, each written in the transaction that
-- creates the stage's batch, so the primary key (run_id, stage) makes a second
-- batch for a stage impossible whichever daemon tries, and however often.
-- The first stage's batch is created with the run (POST); each later one by a
-- daemon's pipelines component once the stage before it has ended, under the
-- run's row lock (FOR UPDATE SKIP LOCKED: daemons never wait for each other).
CREATE TABLE @schema.pipeline_runs (
    id uuid PRIMARY KEY,
    tenant text NOT NULL,
    pipeline text NOT NULL,
    status text NOT NULL DEFAULT 'running',
    -- The stage definitions as configured when the run was submitted
    -- ([{name, handler, items}]): a run finishes as it started, whatever the
    -- configuration says by then.
    stages jsonb NOT NULL,
    on_stage_failure text NOT NULL,
    current_stage integer NOT NULL DEFAULT 0,  -- the index of the newest stage row
    paused boolean NOT NULL DEFAULT false,  -- later stages are created paused too
    cancel_requested boolean NOT NULL DEFAULT false,  -- no later stage is created
    degraded boolean NOT NULL DEFAULT false,  -- a stage ended with failures ("continue")
    metadata jsonb NOT NULL DEFAULT '{}',
    idempotency_key text,
    request_hash text,
    exclusive_key text,
    error jsonb,  -- why the run failed, when a stage's items could not be derived
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CONSTRAINT pipeline_run_status_known CHECK (status IN ('running', 'completed',
        'completed_with_errors', 'failed', 'cancelled')),
    CONSTRAINT pipeline_run_finished_when_terminal CHECK ((status = 'running') = (finished_at IS NULL)),
    CONSTRAINT pipeline_run_on_stage_failure_known CHECK (on_stage_failure IN ('stop', 'continue'))
);
CREATE UNIQUE INDEX pipeline_runs_idempotency ON @schema.pipeline_runs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- At most one running run per (tenant, exclusive key).
CREATE UNIQUE INDEX pipeline_runs_exclusive ON @schema.pipeline_runs (tenant, exclusive_key)
    WHERE exclusive_key IS NOT NULL AND status = 'running';
CREATE INDEX pipeline_runs_listing ON @schema.pipeline_runs (created_at DESC, id DESC);
-- What the pipelines component scans: running runs only.
CREATE INDEX pipeline_runs_running ON @schema.pipeline_runs (created_at) WHERE status = 'running';

CREATE TABLE @schema.pipeline_stages (
    run_id uuid NOT NULL REFERENCES @schema.pipeline_runs (id) ON DELETE CASCADE,
    stage integer NOT NULL,
    batch_id uuid,  -- NULL: skipped (its items function returned no items)
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, stage)
);
CREATE UNIQUE INDEX pipeline_stages_batch ON @schema.pipeline_stages (batch_id);
