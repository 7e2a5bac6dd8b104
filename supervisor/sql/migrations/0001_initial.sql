-- 0001_initial: batches, items, workers, audit log, rate buckets and the
-- transition functions. Every function that changes item states locks the
-- affected batch rows first, in id order, then touches items: one lock order
-- for every writer, so claim, outcome flush, cancel and reaper never deadlock.
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

-- _settle: the one place a batch row changes. Applies counter deltas, enforces
-- the failure budget, derives the status from the counters (terminal exactly
-- when nothing is queued or running), bumps the version once and notifies.
-- Callers hold the batch row lock and have already moved the items.
CREATE FUNCTION @schema._settle(
    p_batch uuid, dq integer, dr integer, ds integer, df integer, dc integer,
    p_actor text, p_reopen boolean DEFAULT false,
    OUT o_finished text, OUT o_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    v_new_version bigint;
    v_cancel integer := 0;
    v_status text;
    v_was_terminal boolean;
BEGIN
    -- Callers hold the row lock already; FOR UPDATE makes a caller that does not
    -- wait here, before reading, instead of overwriting a concurrent change.
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_new_version := b.version + 1;
    b.queued := b.queued + dq;
    b.running := b.running + dr;
    b.succeeded := b.succeeded + ds;
    b.failed := b.failed + df;
    b.cancelled := b.cancelled + dc;
    v_was_terminal := b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled');
    IF p_reopen THEN
        v_was_terminal := false;
        b.stop_reason := NULL;
        b.finished_at := NULL;
        b.callback_state := 'none';
        b.callback_attempts := 0;
        b.callback_error := NULL;
        b.callback_run_after := NULL;
        IF b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
            b.status := 'running';
        END IF;
    END IF;

    -- Failure budget: past it, the batch stops early and ends failed.
    IF NOT v_was_terminal AND b.stop_reason IS NULL AND b.max_failures_limit IS NOT NULL
            AND b.failed > b.max_failures_limit THEN
        b.stop_reason := 'max_failures';
        UPDATE @schema.items
           SET status = 'cancelled', finished_at = now(), finished_version = v_new_version
         WHERE batch_id = p_batch AND status = 'queued';
        GET DIAGNOSTICS v_cancel = ROW_COUNT;
        b.queued := b.queued - v_cancel;
        b.cancelled := b.cancelled + v_cancel;
        INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
        VALUES (p_batch, 'failure_budget_exceeded', p_actor,
                jsonb_build_object('failed', b.failed, 'max_failures', b.max_failures,
                                   'cancelled_queued', v_cancel));
        IF b.running > 0 THEN
            PERFORM pg_notify('@sname_control', 'cancel:' || p_batch::text);
        END IF;
    END IF;

    IF v_was_terminal THEN
        v_status := b.status;
    ELSIF b.queued + b.running = 0 THEN
        v_status := CASE
            WHEN b.stop_reason = 'cancel' THEN 'cancelled'
            WHEN b.stop_reason = 'max_failures' THEN 'failed'
            WHEN b.failed = 0 AND b.cancelled = 0 THEN 'completed'
            WHEN b.succeeded = 0 THEN 'failed'
            ELSE 'completed_with_errors' END;
        b.finished_at := now();
        o_finished := v_status;
        o_seconds := extract(epoch FROM now() - b.created_at);
        IF b.callback_handler IS NOT NULL AND b.callback_state = 'none' THEN
            b.callback_state := 'pending';
            b.callback_run_after := now();
            PERFORM pg_notify('@sname_wake', 'callback');
        END IF;
        INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
        VALUES (p_batch, 'finished', p_actor, jsonb_build_object(
            'status', v_status, 'succeeded', b.succeeded, 'failed', b.failed,
            'cancelled', b.cancelled));
    ELSIF b.stop_reason IS NOT NULL THEN
        v_status := 'cancelling';
    ELSIF b.status = 'paused' THEN
        v_status := 'paused';
    ELSIF b.running + b.succeeded + b.failed + b.cancelled = 0 AND b.started_at IS NULL THEN
        v_status := 'queued';
    ELSE
        v_status := 'running';
    END IF;

    IF b.started_at IS NULL AND (b.running > 0 OR b.succeeded + b.failed > 0) THEN
        b.started_at := now();
        INSERT INTO @schema.batch_events (batch_id, action, actor) VALUES (p_batch, 'started', p_actor);
    END IF;

    UPDATE @schema.batches SET
        status = v_status, queued = b.queued, running = b.running, succeeded = b.succeeded,
        failed = b.failed, cancelled = b.cancelled, version = v_new_version,
        stop_reason = b.stop_reason, started_at = b.started_at, finished_at = b.finished_at,
        callback_state = b.callback_state, callback_attempts = b.callback_attempts,
        callback_error = b.callback_error, callback_run_after = b.callback_run_after
    WHERE id = p_batch;
    PERFORM pg_notify('@sname_batch', p_batch::text || ':' || v_new_version::text || ':' || v_status);
END
$$;

-- claim_items: move up to p_limit runnable items of one handler to running for
-- this worker, committed before any handler runs. Fair across batches of equal
-- priority (each gets a share, fewest running first), higher priority first;
-- respects pause, per-batch max_concurrency, global_concurrency and rate_limit.
CREATE FUNCTION @schema.claim_items(
    p_handler text, p_limit integer, p_worker text, p_lease uuid,
    p_global_cap integer, p_rate double precision, p_burst double precision)
RETURNS TABLE (id bigint, batch_id uuid, key text, payload jsonb, attempts integer,
               max_attempts integer, batch_metadata jsonb)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_limit integer := p_limit;
    v_running integer;
    v_tokens double precision;
    v_total integer := 0;
    v_share integer;
    v_take integer;
    v_n integer;
    v_top integer;
    v_locked uuid[];
    v_pass integer;
    v_ids bigint[];
    v_keys text[];
    v_payloads jsonb[];
    v_attempts integer[];
    v_max integer[];
    v_last_after timestamptz;
    b record;
BEGIN
    IF p_global_cap IS NOT NULL OR p_rate IS NOT NULL THEN
        -- Serialise claims of this handler across daemons so the caps hold.
        PERFORM pg_advisory_xact_lock(hashtext('@sname:claim:' || p_handler));
    END IF;
    IF p_global_cap IS NOT NULL THEN
        SELECT count(*) INTO v_running FROM @schema.items i
         WHERE i.status = 'running' AND i.handler = p_handler;
        v_limit := least(v_limit, p_global_cap - v_running);
    END IF;
    IF p_rate IS NOT NULL THEN
        INSERT INTO @schema.rate_buckets AS r (handler, tokens, updated_at)
        VALUES (p_handler, p_burst, clock_timestamp()) ON CONFLICT (handler) DO NOTHING;
        SELECT least(p_burst, r.tokens + extract(epoch FROM clock_timestamp() - r.updated_at) * p_rate)
          INTO v_tokens FROM @schema.rate_buckets r WHERE r.handler = p_handler;
        v_limit := least(v_limit, floor(v_tokens)::integer);
    END IF;
    IF v_limit <= 0 THEN
        RETURN;
    END IF;

    -- Lock candidate batches in id order (the global lock order), then read
    -- their current counters and allocate in priority/fairness order. Only the
    -- batches locked here are claimed from: the allocation query runs on a newer
    -- snapshot and may see other batches (resumed, submitted, reordered by another
    -- claim meanwhile), whose rows _settle must not write without their lock.
    SELECT array_agg(l.id) INTO v_locked FROM (
        SELECT bt.id FROM @schema.batches bt
         WHERE bt.id IN (
            SELECT c.id FROM @schema.batches c
             WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
               AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
             ORDER BY c.priority DESC, c.running, c.created_at
             LIMIT 16)
         ORDER BY bt.id FOR UPDATE) l;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;

    SELECT max(c.priority) INTO v_top FROM @schema.batches c
     WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0;
    SELECT count(*) INTO v_n FROM @schema.batches c
     WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
       AND c.priority = v_top;
    v_share := greatest(1, ceil(v_limit::numeric / greatest(1, least(v_n, 16))))::integer;

    FOR b IN
        SELECT c.id, c.priority, c.max_concurrency, c.running, c.metadata, c.claim_after,
               c.claim_id
          FROM @schema.batches c
         WHERE c.id = ANY (v_locked)
           AND c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
           AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
         ORDER BY c.priority DESC, c.running, c.created_at
    LOOP
        EXIT WHEN v_total >= v_limit;
        v_take := v_limit - v_total;
        IF b.priority = v_top THEN
            v_take := least(v_take, v_share);
        END IF;
        IF b.max_concurrency IS NOT NULL THEN
            v_take := least(v_take, b.max_concurrency - b.running);
        END IF;
        CONTINUE WHEN v_take <= 0;
        -- Scan from where this batch's last claim stopped: everything before the
        -- cursor was claimed, and its dead index entries are what makes a deep
        -- queue slow; every item queued since (retry, release) got a later
        -- run_after. A short result rescans from the start (pass 2), so an item
        -- left behind the cursor (a claim that rolled back) is never missed.
        v_n := 0;
        FOR v_pass IN 1 .. 2 LOOP
            EXIT WHEN v_n >= v_take OR (v_pass = 2 AND b.claim_after IS NULL);
            WITH picked AS (
                SELECT i.id FROM @schema.items i
                 WHERE i.batch_id = b.id AND i.status = 'queued' AND i.run_after <= now()
                   AND (v_pass = 2 OR b.claim_after IS NULL
                        OR (i.run_after, i.id) > (b.claim_after, b.claim_id))
                 ORDER BY i.run_after, i.id
                 LIMIT v_take - v_n
                 FOR UPDATE SKIP LOCKED
            ), upd AS (
                UPDATE @schema.items i
                   SET status = 'running', attempts = i.attempts + 1, worker = p_worker,
                       lease = p_lease, started_at = now()
                  FROM picked WHERE i.id = picked.id
                RETURNING i.id, i.key, i.payload, i.attempts, i.max_attempts, i.run_after
            )
            SELECT array_agg(upd.id ORDER BY upd.run_after, upd.id),
                   array_agg(upd.key ORDER BY upd.run_after, upd.id),
                   array_agg(upd.payload ORDER BY upd.run_after, upd.id),
                   array_agg(upd.attempts ORDER BY upd.run_after, upd.id),
                   array_agg(upd.max_attempts ORDER BY upd.run_after, upd.id),
                   max(upd.run_after)
              INTO v_ids, v_keys, v_payloads, v_attempts, v_max, v_last_after
              FROM upd;
            CONTINUE WHEN v_ids IS NULL;
            v_n := v_n + cardinality(v_ids);
            IF v_pass = 1 THEN
                UPDATE @schema.batches c SET claim_after = v_last_after,
                       claim_id = v_ids[cardinality(v_ids)]
                 WHERE c.id = b.id;
            END IF;
            RETURN QUERY SELECT x.id, b.id, x.key, x.payload, x.attempts, x.max_attempts,
                                b.metadata
                           FROM unnest(v_ids, v_keys, v_payloads, v_attempts, v_max)
                                AS x (id, key, payload, attempts, max_attempts);
        END LOOP;
        IF v_n > 0 THEN
            v_total := v_total + v_n;
            PERFORM @schema._settle(b.id, -v_n, v_n, 0, 0, 0, p_worker);
        END IF;
    END LOOP;

    IF p_rate IS NOT NULL THEN
        UPDATE @schema.rate_buckets r SET tokens = v_tokens - v_total, updated_at = clock_timestamp()
         WHERE r.handler = p_handler;
    END IF;
END
$$;

-- (Redefined by 0002_apply_outcomes_by_id: items are probed by (lease, id).)
-- apply_outcomes: the fenced outcome write of one lease. Each row names the
-- attempt it belongs to; a row whose item is no longer running under this lease
-- and attempt changes nothing (a zombie's late write). Outcomes:
--   succeeded, failed (permanent), cancelled   -> that status
--   retry, lost (worker died)                  -> queued after the delay, or
--                                                 failed when attempts are spent
--   released (drain, pause)                    -> queued, attempt not counted
-- A batch that is stopping turns every retry/lost/released outcome into cancelled.
-- p_batches lists the items' batches (locked first, in id order). Returns one row
-- per batch that became terminal ('batch'), per stale write ('fenced'), and per
-- applied item whose outcome was not 'succeeded' ('item': its new status).
CREATE FUNCTION @schema.apply_outcomes(
    p_lease uuid, p_batches uuid[], p_ids bigint[], p_attempts integer[], p_outcomes text[],
    p_results jsonb[], p_errors jsonb[], p_delays double precision[], p_actor text)
RETURNS TABLE (kind text, id text, batch_id uuid, status text, seconds double precision,
               handler text)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_applied bigint[];
    v_other bigint[];
    v_bid uuid[];
    v_n integer[];
    v_nq integer[];
    v_ns integer[];
    v_nf integer[];
    v_nc integer[];
    s record;
    i integer;
BEGIN
    PERFORM 1 FROM @schema.batches bt WHERE bt.id = ANY (p_batches) ORDER BY bt.id FOR UPDATE;

    -- Final outcomes (succeeded, failed, cancelled) need no decision: one plain
    -- fenced UPDATE, the hot path. Retry, lost and released go through the
    -- decision below (attempts left? batch stopping?).
    WITH u AS (
        SELECT * FROM unnest(p_ids, p_attempts, p_outcomes, p_results, p_errors, p_delays)
                      AS u (id, attempt, outcome, result, error, delay)
    ), upd AS (
        UPDATE @schema.items it SET
            status = CASE
                WHEN u.outcome IN ('succeeded', 'failed', 'cancelled') THEN u.outcome
                WHEN bt.stop_reason IS NOT NULL THEN 'cancelled'
                WHEN u.outcome = 'released' THEN 'queued'
                WHEN it.attempts >= it.max_attempts THEN 'failed'
                ELSE 'queued' END,
            result = CASE WHEN u.outcome = 'succeeded' THEN u.result ELSE it.result END,
            errors = CASE WHEN u.error IS NULL THEN it.errors
                          ELSE it.errors || jsonb_build_array(u.error) END,
            max_attempts = it.max_attempts + (u.outcome = 'released')::integer,
            run_after = now() + make_interval(secs => coalesce(u.delay, 0)),
            lease = NULL,
            finished_at = now(),
            finished_version = bt.version + 1
          FROM u, @schema.batches bt
         WHERE it.id = u.id AND it.status = 'running' AND it.lease = p_lease
           AND it.attempts = u.attempt AND bt.id = it.batch_id
        RETURNING it.id, it.batch_id, it.status, it.handler, u.outcome
    ), per_batch AS (
        SELECT upd.batch_id AS bid, count(*)::integer AS n,
               (count(*) FILTER (WHERE upd.status = 'queued'))::integer AS nq,
               (count(*) FILTER (WHERE upd.status = 'succeeded'))::integer AS ns,
               (count(*) FILTER (WHERE upd.status = 'failed'))::integer AS nf,
               (count(*) FILTER (WHERE upd.status = 'cancelled'))::integer AS nc
          FROM upd GROUP BY upd.batch_id
    )
    SELECT (SELECT array_agg(upd.id) FROM upd),
           (SELECT array_agg(upd.id) FROM upd WHERE upd.outcome <> 'succeeded'),
           array_agg(pb.bid ORDER BY pb.bid), array_agg(pb.n ORDER BY pb.bid),
           array_agg(pb.nq ORDER BY pb.bid), array_agg(pb.ns ORDER BY pb.bid),
           array_agg(pb.nf ORDER BY pb.bid), array_agg(pb.nc ORDER BY pb.bid)
      INTO v_applied, v_other, v_bid, v_n, v_nq, v_ns, v_nf, v_nc
      FROM per_batch pb;

    IF v_applied IS NULL OR cardinality(v_applied) < cardinality(p_ids) THEN
        RETURN QUERY SELECT 'fenced'::text, x.id::text, NULL::uuid, NULL::text,
                            NULL::double precision, NULL::text
                       FROM unnest(p_ids) AS x (id)
                      WHERE v_applied IS NULL OR x.id <> ALL (v_applied);
    END IF;
    IF v_applied IS NULL THEN
        RETURN;
    END IF;

    -- queued items are not finished: clear what the hot UPDATE set for everyone
    UPDATE @schema.items it SET finished_at = NULL, finished_version = NULL
     WHERE it.id = ANY (v_other) AND it.status = 'queued';

    FOR i IN 1 .. cardinality(v_bid) LOOP
        s := @schema._settle(v_bid[i], v_nq[i], -v_n[i], v_ns[i], v_nf[i], v_nc[i], p_actor);
        IF s.o_finished IS NOT NULL THEN
            RETURN QUERY SELECT 'batch'::text, v_bid[i]::text, v_bid[i], s.o_finished,
                                s.o_seconds, NULL::text;
        END IF;
    END LOOP;
    IF v_other IS NOT NULL THEN
        RETURN QUERY SELECT 'item'::text, it.id::text, it.batch_id, it.status,
                            NULL::double precision, it.handler
                       FROM @schema.items it WHERE it.id = ANY (v_other);
    END IF;
END
$$;

-- reclaim_leases: items still running under leases that are gone (a dead or
-- restarted worker) go back through apply_outcomes as 'lost', with a
-- WorkerLost error recorded for the attempt; their callbacks go back to pending.
CREATE FUNCTION @schema.reclaim_leases(p_leases uuid[], p_actor text)
RETURNS TABLE (kind text, id text, batch_id uuid, status text, seconds double precision,
               handler text)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_lease uuid;
    v_ids bigint[];
    v_att integer[];
    v_bat uuid[];
    v_err jsonb[];
BEGIN
    UPDATE @schema.batches bt SET callback_state = 'pending', callback_lease = NULL,
           callback_run_after = now(), version = bt.version + 1
     WHERE bt.callback_state = 'running' AND bt.callback_lease = ANY (p_leases);
    FOREACH v_lease IN ARRAY p_leases LOOP
        SELECT array_agg(i.id), array_agg(i.attempts), array_agg(DISTINCT i.batch_id),
               array_agg(jsonb_build_object(
                   'attempt', i.attempts, 'type', 'WorkerLost',
                   'message', format('worker %s stopped heartbeating or restarted while '
                                     'running attempt %s', coalesce(i.worker, '?'), i.attempts),
                   'traceback', NULL, 'at', now(), 'worker', i.worker))
          INTO v_ids, v_att, v_bat, v_err
          FROM @schema.items i WHERE i.status = 'running' AND i.lease = v_lease;
        CONTINUE WHEN v_ids IS NULL;
        RETURN QUERY SELECT * FROM @schema.apply_outcomes(
            v_lease, v_bat, v_ids, v_att, array_fill('lost'::text, ARRAY[cardinality(v_ids)]),
            array_fill(NULL::jsonb, ARRAY[cardinality(v_ids)]), v_err,
            array_fill(0::double precision, ARRAY[cardinality(v_ids)]), p_actor);
    END LOOP;
END
$$;

-- Batch controls. Each returns 'ok', 'not_found' or 'conflict:<reason>'; the
-- batch row is locked first (the global lock order) and every change goes
-- through _settle so counters, status and version move together.
CREATE FUNCTION @schema.cancel_batch(p_batch uuid, p_tenant text, p_actor text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    v_n integer;
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('cancelled', 'cancelling') THEN RETURN 'ok'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    UPDATE @schema.items SET status = 'cancelled', finished_at = now(), finished_version = b.version + 1
     WHERE batch_id = p_batch AND status = 'queued';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    UPDATE @schema.batches SET stop_reason = 'cancel' WHERE id = p_batch;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'cancel_requested', p_actor,
            jsonb_build_object('cancelled_queued', v_n, 'running', b.running));
    PERFORM @schema._settle(p_batch, -v_n, 0, 0, 0, v_n, p_actor);
    IF b.running > 0 THEN
        PERFORM pg_notify('@sname_control', 'cancel:' || p_batch::text);
    END IF;
    RETURN 'ok';
END
$$;

CREATE FUNCTION @schema.pause_batch(p_batch uuid, p_tenant text, p_actor text, p_pause boolean)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    IF b.status = 'cancelling' THEN RETURN 'conflict:batch is being cancelled'; END IF;
    IF p_pause = (b.status = 'paused') THEN RETURN 'ok'; END IF;
    IF p_pause THEN
        UPDATE @schema.batches SET status = 'paused' WHERE id = p_batch;
        -- daemons hand back claimed items that have not started yet
        PERFORM pg_notify('@sname_control', 'pause:' || p_batch::text);
    ELSE
        UPDATE @schema.batches SET status = 'running' WHERE id = p_batch;
        PERFORM pg_notify('@sname_wake', b.handler);
    END IF;
    INSERT INTO @schema.batch_events (batch_id, action, actor)
    VALUES (p_batch, CASE WHEN p_pause THEN 'paused' ELSE 'resumed' END, p_actor);
    PERFORM @schema._settle(p_batch, 0, 0, 0, 0, 0, p_actor);
    RETURN 'ok';
END
$$;

CREATE FUNCTION @schema.retry_batch(p_batch uuid, p_tenant text, p_actor text,
                                    p_include_cancelled boolean)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    v_failed integer;
    v_cancelled integer;
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status = 'cancelling' THEN RETURN 'conflict:batch is being cancelled'; END IF;
    -- The counters are exact (a CHECK-guarded invariant), so they say how many move.
    v_failed := b.failed;
    v_cancelled := CASE WHEN p_include_cancelled THEN b.cancelled ELSE 0 END;
    IF v_failed + v_cancelled = 0 THEN
        RETURN 'conflict:nothing to retry';
    END IF;
    UPDATE @schema.items
       SET max_attempts = max_attempts + b.attempt_budget, status = 'queued', run_after = now(),
           finished_at = NULL, finished_version = NULL
     WHERE batch_id = p_batch
       AND (status = 'failed' OR (p_include_cancelled AND status = 'cancelled'));
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'retried', p_actor, jsonb_build_object(
        'failed', v_failed, 'cancelled', v_cancelled));
    PERFORM @schema._settle(p_batch, v_failed + v_cancelled, 0, 0, -v_failed, -v_cancelled,
                            p_actor, true);
    PERFORM pg_notify('@sname_wake', b.handler);
    RETURN 'ok';
END
$$;

CREATE FUNCTION @schema.patch_batch(p_batch uuid, p_tenant text, p_actor text,
                                    p_fields jsonb, p_priority integer, p_max_concurrency integer,
                                    p_max_failures jsonb, p_max_failures_limit integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    UPDATE @schema.batches SET
        priority = CASE WHEN p_fields ? 'priority' THEN p_priority ELSE priority END,
        max_concurrency = CASE WHEN p_fields ? 'max_concurrency' THEN p_max_concurrency
                               ELSE max_concurrency END,
        max_failures = CASE WHEN p_fields ? 'max_failures' THEN p_max_failures ELSE max_failures END,
        max_failures_limit = CASE WHEN p_fields ? 'max_failures' THEN p_max_failures_limit
                                  ELSE max_failures_limit END
     WHERE id = p_batch;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'updated', p_actor, p_fields);
    PERFORM @schema._settle(p_batch, 0, 0, 0, 0, 0, p_actor);
    PERFORM pg_notify('@sname_wake', b.handler);
    RETURN 'ok';
END
$$;

-- repair_batch: doctor --repair. Recompute a batch's counters from its items
-- and re-derive its status in one guarded UPDATE (the CHECKs still hold). A
-- terminal status is re-derived too (stop_reason keeps cancelled/failed-by-budget):
-- keeping the old one could leave 'completed' over items that failed.
CREATE FUNCTION @schema.repair_batch(p_batch uuid, p_actor text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    n integer; q integer; r integer; s integer; f integer; c integer;
    v_status text;
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    SELECT count(*), count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
      INTO n, q, r, s, f, c FROM @schema.items WHERE batch_id = p_batch;
    IF n = 0 THEN RETURN 'empty'; END IF;
    IF q + r = 0 THEN
        v_status := CASE
            WHEN b.stop_reason = 'cancel' THEN 'cancelled'
            WHEN b.stop_reason = 'max_failures' THEN 'failed'
            WHEN f = 0 AND c = 0 THEN 'completed'
            WHEN s = 0 THEN 'failed'
            ELSE 'completed_with_errors' END;
    ELSE
        v_status := CASE
            WHEN b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN 'running'
            ELSE b.status END;
    END IF;
    UPDATE @schema.batches SET
        total = n, queued = q, running = r, succeeded = s, failed = f, cancelled = c,
        status = v_status, version = version + 1,
        finished_at = CASE WHEN q + r = 0 THEN coalesce(finished_at, now()) END
     WHERE id = p_batch;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'repaired', p_actor, jsonb_build_object(
        'before', jsonb_build_object('status', b.status, 'total', b.total, 'queued', b.queued,
            'running', b.running, 'succeeded', b.succeeded, 'failed', b.failed,
            'cancelled', b.cancelled),
        'after', jsonb_build_object('status', v_status, 'total', n, 'queued', q, 'running', r,
            'succeeded', s, 'failed', f, 'cancelled', c)));
    PERFORM pg_notify('@sname_batch', p_batch::text || ':' || (b.version + 1)::text || ':' || v_status);
    RETURN v_status;
END
$$;
