-- 0001_initial: batches, items, workers, audit log and rate buckets. The
-- transition functions are not here: each has one current definition in
-- supervisor/sql/functions/, which `migrate` applies after the migrations.
--
-- Tokens replaced when the file is loaded (see supervisor/sqlfile.py):
--   @schema  the quoted schema identifier      @sname  the bare schema name

CREATE TABLE @schema.batches (
    id                   uuid PRIMARY KEY,
    tenant               text NOT NULL,
    handler              text NOT NULL,
    status               text NOT NULL,
    priority             integer NOT NULL DEFAULT 0,
    max_concurrency      integer,
    max_attempts         integer,
    attempt_budget       integer NOT NULL,
    max_failures         jsonb,
    max_failures_limit   integer,
    stop_reason          text,
    metadata             jsonb NOT NULL DEFAULT '{}',
    idempotency_key      text,
    request_hash         text,
    total                integer NOT NULL,
    queued               integer NOT NULL,
    running              integer NOT NULL DEFAULT 0,
    succeeded            integer NOT NULL DEFAULT 0,
    failed               integer NOT NULL DEFAULT 0,
    cancelled            integer NOT NULL DEFAULT 0,
    version              bigint NOT NULL DEFAULT 1,
    created_by           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz,
    callback_handler     text,
    callback_state       text NOT NULL DEFAULT 'none',
    callback_attempts    integer NOT NULL DEFAULT 0,
    callback_error       jsonb,
    callback_run_after   timestamptz,
    callback_lease       uuid,
    callback_worker      text,
    claim_after          timestamptz,  -- (claim_after, claim_id): where the last claim
    claim_id             bigint,       -- of this batch stopped (see claim_items)
    CONSTRAINT batch_status_known CHECK (status IN ('queued', 'running', 'paused', 'cancelling',
        'completed', 'completed_with_errors', 'failed', 'cancelled')),
    CONSTRAINT batch_counts_sum CHECK (total = queued + running + succeeded + failed + cancelled),
    CONSTRAINT batch_counts_nonnegative CHECK (
        queued >= 0 AND running >= 0 AND succeeded >= 0 AND failed >= 0 AND cancelled >= 0),
    CONSTRAINT batch_has_items CHECK (total >= 1),
    CONSTRAINT batch_terminal_iff_drained CHECK (
        (status IN ('completed', 'completed_with_errors', 'failed', 'cancelled'))
        = (queued + running = 0)),
    CONSTRAINT batch_callback_state_known CHECK (
        callback_state IN ('none', 'pending', 'running', 'succeeded', 'failed'))
);
CREATE UNIQUE INDEX batches_idempotency ON @schema.batches (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX batches_listing ON @schema.batches (tenant, created_at DESC, id DESC);
CREATE INDEX batches_active ON @schema.batches (handler, priority DESC)
    WHERE status IN ('queued', 'running');
CREATE INDEX batches_callbacks ON @schema.batches (callback_run_after)
    WHERE callback_state IN ('pending', 'running');
CREATE INDEX batches_finished ON @schema.batches (finished_at) WHERE finished_at IS NOT NULL;

-- items.batch_id has no FOREIGN KEY on purpose: the per-row RI check doubled the
-- cost of COPYing a 100,000-item batch. Items are only inserted by the submission
-- transaction that inserts their batch, and only deleted together with it (the
-- delete_batch and retention_delete queries); `doctor` reports orphans.
CREATE TABLE @schema.items (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id         uuid NOT NULL,
    seq              integer NOT NULL,
    key              text,
    handler          text NOT NULL,
    status           text NOT NULL DEFAULT 'queued',
    payload          jsonb NOT NULL,
    result           jsonb,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    run_after        timestamptz NOT NULL DEFAULT now(),
    worker           text,
    lease            uuid,
    errors           jsonb NOT NULL DEFAULT '[]',
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    finished_version bigint,
    CONSTRAINT item_status_known CHECK (
        status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT item_running_has_lease CHECK ((status = 'running') = (lease IS NOT NULL)),
    CONSTRAINT item_attempts_nonnegative CHECK (attempts >= 0)
);
CREATE INDEX items_by_batch ON @schema.items (batch_id, id);
CREATE INDEX items_runnable ON @schema.items (batch_id, run_after, id) WHERE status = 'queued';
CREATE INDEX items_running ON @schema.items (lease) WHERE status = 'running';  -- (lease, id) since 0002
CREATE INDEX items_finished ON @schema.items (batch_id, finished_version)
    WHERE finished_version IS NOT NULL;
CREATE UNIQUE INDEX items_key ON @schema.items (batch_id, key) WHERE key IS NOT NULL;

CREATE TABLE @schema.batch_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id  uuid NOT NULL REFERENCES @schema.batches (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    action    text NOT NULL,
    actor     text NOT NULL,
    detail    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX batch_events_by_batch ON @schema.batch_events (batch_id, id);

CREATE TABLE @schema.workers (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    state         text NOT NULL DEFAULT 'running',
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    in_flight     integer NOT NULL DEFAULT 0,
    concurrency   integer NOT NULL,
    CONSTRAINT worker_state_known CHECK (state IN ('running', 'draining'))
);
CREATE INDEX workers_by_name ON @schema.workers (name);

CREATE TABLE @schema.rate_buckets (
    handler     text PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL
);
