-- The schema "supervisor" as release 0.1.0 left it at schema version 4, before the
-- transition functions moved to supervisor/sql/functions/ (pg_dump --schema-only
-- --no-owner --no-privileges --inserts of a fresh install, psql lines and SETs but one removed).
-- tests/migration/test_upgrade.py upgrades it and compares it with a fresh install.
SET check_function_bodies = false;
-- PostgreSQL database dump


-- Dumped from database version 18.6
-- Dumped by pg_dump version 18.6


-- Name: supervisor; Type: SCHEMA; Schema: -; Owner: -

CREATE SCHEMA supervisor;


-- Name: _settle(uuid, integer, integer, integer, integer, integer, text, boolean); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor._settle(p_batch uuid, dq integer, dr integer, ds integer, df integer, dc integer, p_actor text, p_reopen boolean DEFAULT false, OUT o_finished text, OUT o_seconds double precision) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
    b "supervisor".batches%ROWTYPE;
    v_new_version bigint;
    v_cancel integer := 0;
    v_status text;
    v_was_terminal boolean;
BEGIN
    -- Callers hold the row lock already; FOR UPDATE makes a caller that does not
    -- wait here, before reading, instead of overwriting a concurrent change.
    SELECT * INTO b FROM "supervisor".batches WHERE id = p_batch FOR UPDATE;
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
        UPDATE "supervisor".items
           SET status = 'cancelled', finished_at = now(), finished_version = v_new_version
         WHERE batch_id = p_batch AND status = 'queued';
        GET DIAGNOSTICS v_cancel = ROW_COUNT;
        b.queued := b.queued - v_cancel;
        b.cancelled := b.cancelled + v_cancel;
        INSERT INTO "supervisor".batch_events (batch_id, action, actor, detail)
        VALUES (p_batch, 'failure_budget_exceeded', p_actor,
                jsonb_build_object('failed', b.failed, 'max_failures', b.max_failures,
                                   'cancelled_queued', v_cancel));
        IF b.running > 0 THEN
            PERFORM pg_notify('supervisor_control', 'cancel:' || p_batch::text);
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
            PERFORM pg_notify('supervisor_wake', 'callback');
        END IF;
        INSERT INTO "supervisor".batch_events (batch_id, action, actor, detail)
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
        INSERT INTO "supervisor".batch_events (batch_id, action, actor) VALUES (p_batch, 'started', p_actor);
    END IF;

    UPDATE "supervisor".batches SET
        status = v_status, queued = b.queued, running = b.running, succeeded = b.succeeded,
        failed = b.failed, cancelled = b.cancelled, version = v_new_version,
        stop_reason = b.stop_reason, started_at = b.started_at, finished_at = b.finished_at,
        callback_state = b.callback_state, callback_attempts = b.callback_attempts,
        callback_error = b.callback_error, callback_run_after = b.callback_run_after
    WHERE id = p_batch;
    PERFORM pg_notify('supervisor_batch', p_batch::text || ':' || v_new_version::text || ':' || v_status);
END
$$;


-- Name: apply_outcomes(uuid, uuid[], bigint[], integer[], text[], jsonb[], jsonb[], double precision[], text); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.apply_outcomes(p_lease uuid, p_batches uuid[], p_ids bigint[], p_attempts integer[], p_outcomes text[], p_results jsonb[], p_errors jsonb[], p_delays double precision[], p_actor text) RETURNS TABLE(kind text, id text, batch_id uuid, status text, seconds double precision, handler text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    SET enable_nestloop TO 'off'
    AS $$
#variable_conflict use_column
DECLARE
    v_locked uuid[];
    v_versions bigint[];
    v_stopping uuid[];
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
    SELECT array_agg(l.id), array_agg(l.version),
           array_agg(l.id) FILTER (WHERE l.stop_reason IS NOT NULL)
      INTO v_locked, v_versions, v_stopping
      FROM (SELECT bt.id, bt.version, bt.stop_reason FROM "supervisor".batches bt
             WHERE bt.id = ANY (p_batches) ORDER BY bt.id FOR UPDATE) l;

    -- Final outcomes (succeeded, failed, cancelled) need no decision: one plain
    -- fenced UPDATE, the hot path. Retry, lost and released go through the
    -- decision below (attempts left? batch stopping?).
    WITH u AS (
        SELECT * FROM unnest(p_ids, p_attempts, p_outcomes, p_results, p_errors, p_delays)
                      AS u (id, attempt, outcome, result, error, delay)
    ), upd AS (
        UPDATE "supervisor".items it SET
            status = CASE
                WHEN u.outcome IN ('succeeded', 'failed', 'cancelled') THEN u.outcome
                WHEN it.batch_id = ANY (v_stopping) THEN 'cancelled'
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
            finished_version = v_versions[array_position(v_locked, it.batch_id)] + 1
          FROM u
         WHERE it.status = 'running' AND it.lease = p_lease AND it.id = ANY (p_ids)
           AND it.id = u.id
           AND it.attempts = u.attempt AND it.batch_id = ANY (v_locked)
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
    UPDATE "supervisor".items it SET finished_at = NULL, finished_version = NULL
     WHERE it.id = ANY (v_other) AND it.status = 'queued';

    FOR i IN 1 .. cardinality(v_bid) LOOP
        s := "supervisor"._settle(v_bid[i], v_nq[i], -v_n[i], v_ns[i], v_nf[i], v_nc[i], p_actor);
        IF s.o_finished IS NOT NULL THEN
            RETURN QUERY SELECT 'batch'::text, v_bid[i]::text, v_bid[i], s.o_finished,
                                s.o_seconds, NULL::text;
        END IF;
    END LOOP;
    IF v_other IS NOT NULL THEN
        RETURN QUERY SELECT 'item'::text, it.id::text, it.batch_id, it.status,
                            NULL::double precision, it.handler
                       FROM "supervisor".items it WHERE it.id = ANY (v_other);
    END IF;
END
$$;


-- Name: cancel_batch(uuid, text, text); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.cancel_batch(p_batch uuid, p_tenant text, p_actor text) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    b "supervisor".batches%ROWTYPE;
    v_n integer;
BEGIN
    SELECT * INTO b FROM "supervisor".batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('cancelled', 'cancelling') THEN RETURN 'ok'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    UPDATE "supervisor".items SET status = 'cancelled', finished_at = now(), finished_version = b.version + 1
     WHERE batch_id = p_batch AND status = 'queued';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    UPDATE "supervisor".batches SET stop_reason = 'cancel' WHERE id = p_batch;
    INSERT INTO "supervisor".batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'cancel_requested', p_actor,
            jsonb_build_object('cancelled_queued', v_n, 'running', b.running));
    PERFORM "supervisor"._settle(p_batch, -v_n, 0, 0, 0, v_n, p_actor);
    IF b.running > 0 THEN
        PERFORM pg_notify('supervisor_control', 'cancel:' || p_batch::text);
    END IF;
    RETURN 'ok';
END
$$;


-- Name: claim_items(text, integer, text, uuid, integer, double precision, double precision); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.claim_items(p_handler text, p_limit integer, p_worker text, p_lease uuid, p_global_cap integer, p_rate double precision, p_burst double precision) RETURNS TABLE(id bigint, batch_id uuid, key text, payload jsonb, attempts integer, max_attempts integer, batch_metadata jsonb)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
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
        PERFORM pg_advisory_xact_lock(hashtext('supervisor:claim:' || p_handler));
    END IF;
    IF p_global_cap IS NOT NULL THEN
        SELECT count(*) INTO v_running FROM "supervisor".items i
         WHERE i.status = 'running' AND i.handler = p_handler;
        v_limit := least(v_limit, p_global_cap - v_running);
    END IF;
    IF p_rate IS NOT NULL THEN
        INSERT INTO "supervisor".rate_buckets AS r (handler, tokens, updated_at)
        VALUES (p_handler, p_burst, clock_timestamp()) ON CONFLICT (handler) DO NOTHING;
        SELECT least(p_burst, r.tokens + extract(epoch FROM clock_timestamp() - r.updated_at) * p_rate)
          INTO v_tokens FROM "supervisor".rate_buckets r WHERE r.handler = p_handler;
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
        SELECT bt.id FROM "supervisor".batches bt
         WHERE bt.id IN (
            SELECT c.id FROM "supervisor".batches c
             WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
               AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
             ORDER BY c.priority DESC, c.running, c.created_at
             LIMIT 16)
         ORDER BY bt.id FOR UPDATE) l;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;

    SELECT max(c.priority) INTO v_top FROM "supervisor".batches c
     WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0;
    SELECT count(*) INTO v_n FROM "supervisor".batches c
     WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
       AND c.priority = v_top;
    v_share := greatest(1, ceil(v_limit::numeric / greatest(1, least(v_n, 16))))::integer;

    FOR b IN
        SELECT c.id, c.priority, c.max_concurrency, c.running, c.metadata, c.claim_after,
               c.claim_id
          FROM "supervisor".batches c
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
                SELECT i.id FROM "supervisor".items i
                 WHERE i.batch_id = b.id AND i.status = 'queued' AND i.run_after <= now()
                   AND (v_pass = 2 OR b.claim_after IS NULL
                        OR (i.run_after, i.id) > (b.claim_after, b.claim_id))
                 ORDER BY i.run_after, i.id
                 LIMIT v_take - v_n
                 FOR UPDATE SKIP LOCKED
            ), upd AS (
                UPDATE "supervisor".items i
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
                UPDATE "supervisor".batches c SET claim_after = v_last_after,
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
            PERFORM "supervisor"._settle(b.id, -v_n, v_n, 0, 0, 0, p_worker);
        END IF;
    END LOOP;

    IF p_rate IS NOT NULL THEN
        UPDATE "supervisor".rate_buckets r SET tokens = v_tokens - v_total, updated_at = clock_timestamp()
         WHERE r.handler = p_handler;
    END IF;
END
$$;


-- Name: patch_batch(uuid, text, text, jsonb, integer, integer, jsonb, integer); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.patch_batch(p_batch uuid, p_tenant text, p_actor text, p_fields jsonb, p_priority integer, p_max_concurrency integer, p_max_failures jsonb, p_max_failures_limit integer) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    b "supervisor".batches%ROWTYPE;
BEGIN
    SELECT * INTO b FROM "supervisor".batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    UPDATE "supervisor".batches SET
        priority = CASE WHEN p_fields ? 'priority' THEN p_priority ELSE priority END,
        max_concurrency = CASE WHEN p_fields ? 'max_concurrency' THEN p_max_concurrency
                               ELSE max_concurrency END,
        max_failures = CASE WHEN p_fields ? 'max_failures' THEN p_max_failures ELSE max_failures END,
        max_failures_limit = CASE WHEN p_fields ? 'max_failures' THEN p_max_failures_limit
                                  ELSE max_failures_limit END
     WHERE id = p_batch;
    INSERT INTO "supervisor".batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'updated', p_actor, p_fields);
    PERFORM "supervisor"._settle(p_batch, 0, 0, 0, 0, 0, p_actor);
    PERFORM pg_notify('supervisor_wake', b.handler);
    RETURN 'ok';
END
$$;


-- Name: pause_batch(uuid, text, text, boolean); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.pause_batch(p_batch uuid, p_tenant text, p_actor text, p_pause boolean) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    b "supervisor".batches%ROWTYPE;
BEGIN
    SELECT * INTO b FROM "supervisor".batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    IF b.status = 'cancelling' THEN RETURN 'conflict:batch is being cancelled'; END IF;
    IF p_pause = (b.status = 'paused') THEN RETURN 'ok'; END IF;
    IF p_pause THEN
        UPDATE "supervisor".batches SET status = 'paused' WHERE id = p_batch;
        -- daemons hand back claimed items that have not started yet
        PERFORM pg_notify('supervisor_control', 'pause:' || p_batch::text);
    ELSE
        UPDATE "supervisor".batches SET status = 'running' WHERE id = p_batch;
        PERFORM pg_notify('supervisor_wake', b.handler);
    END IF;
    INSERT INTO "supervisor".batch_events (batch_id, action, actor)
    VALUES (p_batch, CASE WHEN p_pause THEN 'paused' ELSE 'resumed' END, p_actor);
    PERFORM "supervisor"._settle(p_batch, 0, 0, 0, 0, 0, p_actor);
    RETURN 'ok';
END
$$;


-- Name: reclaim_leases(uuid[], text); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.reclaim_leases(p_leases uuid[], p_actor text) RETURNS TABLE(kind text, id text, batch_id uuid, status text, seconds double precision, handler text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
#variable_conflict use_column
DECLARE
    v_lease uuid;
    v_ids bigint[];
    v_att integer[];
    v_bat uuid[];
    v_err jsonb[];
BEGIN
    UPDATE "supervisor".batches bt SET callback_state = 'pending', callback_lease = NULL,
           callback_run_after = now(), version = bt.version + 1
     WHERE bt.callback_state = 'running' AND bt.callback_lease = ANY (p_leases);
    FOREACH v_lease IN ARRAY p_leases LOOP
        SELECT array_agg(i.id), array_agg(i.attempts), array_agg(DISTINCT i.batch_id),
               array_agg(jsonb_build_object(
                   'attempt', i.attempts, 'type', 'WorkerLost',
                   'message', format('worker %s stopped heartbeating or restarted while it held '
                                     'attempt %s (claimed; not known whether its handler had '
                                     'started)', coalesce(i.worker, '?'), i.attempts),
                   'traceback', NULL, 'at', now(), 'worker', i.worker))
          INTO v_ids, v_att, v_bat, v_err
          FROM "supervisor".items i WHERE i.status = 'running' AND i.lease = v_lease;
        CONTINUE WHEN v_ids IS NULL;
        RETURN QUERY SELECT * FROM "supervisor".apply_outcomes(
            v_lease, v_bat, v_ids, v_att, array_fill('lost'::text, ARRAY[cardinality(v_ids)]),
            array_fill(NULL::jsonb, ARRAY[cardinality(v_ids)]), v_err,
            array_fill(0::double precision, ARRAY[cardinality(v_ids)]), p_actor);
    END LOOP;
END
$$;


-- Name: repair_batch(uuid, text); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.repair_batch(p_batch uuid, p_actor text) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    b "supervisor".batches%ROWTYPE;
    n integer; q integer; r integer; s integer; f integer; c integer;
    v_status text;
BEGIN
    SELECT * INTO b FROM "supervisor".batches WHERE id = p_batch FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    SELECT count(*), count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
      INTO n, q, r, s, f, c FROM "supervisor".items WHERE batch_id = p_batch;
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
    UPDATE "supervisor".batches SET
        total = n, queued = q, running = r, succeeded = s, failed = f, cancelled = c,
        status = v_status, version = version + 1,
        finished_at = CASE WHEN q + r = 0 THEN coalesce(finished_at, now()) END
     WHERE id = p_batch;
    INSERT INTO "supervisor".batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'repaired', p_actor, jsonb_build_object(
        'before', jsonb_build_object('status', b.status, 'total', b.total, 'queued', b.queued,
            'running', b.running, 'succeeded', b.succeeded, 'failed', b.failed,
            'cancelled', b.cancelled),
        'after', jsonb_build_object('status', v_status, 'total', n, 'queued', q, 'running', r,
            'succeeded', s, 'failed', f, 'cancelled', c)));
    PERFORM pg_notify('supervisor_batch', p_batch::text || ':' || (b.version + 1)::text || ':' || v_status);
    RETURN v_status;
END
$$;


-- Name: retry_batch(uuid, text, text, boolean); Type: FUNCTION; Schema: supervisor; Owner: -

CREATE FUNCTION supervisor.retry_batch(p_batch uuid, p_tenant text, p_actor text, p_include_cancelled boolean) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    b "supervisor".batches%ROWTYPE;
    v_failed integer;
    v_cancelled integer;
BEGIN
    SELECT * INTO b FROM "supervisor".batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status = 'cancelling' THEN RETURN 'conflict:batch is being cancelled'; END IF;
    -- The counters are exact (a CHECK-guarded invariant), so they say how many move.
    v_failed := b.failed;
    v_cancelled := CASE WHEN p_include_cancelled THEN b.cancelled ELSE 0 END;
    IF v_failed + v_cancelled = 0 THEN
        RETURN 'conflict:nothing to retry';
    END IF;
    UPDATE "supervisor".items
       SET max_attempts = max_attempts + b.attempt_budget, status = 'queued', run_after = now(),
           finished_at = NULL, finished_version = NULL
     WHERE batch_id = p_batch
       AND (status = 'failed' OR (p_include_cancelled AND status = 'cancelled'));
    INSERT INTO "supervisor".batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'retried', p_actor, jsonb_build_object(
        'failed', v_failed, 'cancelled', v_cancelled));
    PERFORM "supervisor"._settle(p_batch, v_failed + v_cancelled, 0, 0, -v_failed, -v_cancelled,
                            p_actor, true);
    PERFORM pg_notify('supervisor_wake', b.handler);
    RETURN 'ok';
END
$$;




-- Name: batch_events; Type: TABLE; Schema: supervisor; Owner: -

CREATE TABLE supervisor.batch_events (
    id bigint NOT NULL,
    batch_id uuid NOT NULL,
    at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    action text NOT NULL,
    actor text NOT NULL,
    detail jsonb DEFAULT '{}'::jsonb NOT NULL
);


-- Name: batch_events_id_seq; Type: SEQUENCE; Schema: supervisor; Owner: -

ALTER TABLE supervisor.batch_events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME supervisor.batch_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


-- Name: batches; Type: TABLE; Schema: supervisor; Owner: -

CREATE TABLE supervisor.batches (
    id uuid NOT NULL,
    tenant text NOT NULL,
    handler text NOT NULL,
    status text NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    max_concurrency integer,
    max_attempts integer,
    attempt_budget integer NOT NULL,
    max_failures jsonb,
    max_failures_limit integer,
    stop_reason text,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    idempotency_key text,
    request_hash text,
    total integer NOT NULL,
    queued integer NOT NULL,
    running integer DEFAULT 0 NOT NULL,
    succeeded integer DEFAULT 0 NOT NULL,
    failed integer DEFAULT 0 NOT NULL,
    cancelled integer DEFAULT 0 NOT NULL,
    version bigint DEFAULT 1 NOT NULL,
    created_by text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    callback_handler text,
    callback_state text DEFAULT 'none'::text NOT NULL,
    callback_attempts integer DEFAULT 0 NOT NULL,
    callback_error jsonb,
    callback_run_after timestamp with time zone,
    callback_lease uuid,
    callback_worker text,
    claim_after timestamp with time zone,
    claim_id bigint,
    CONSTRAINT batch_callback_state_known CHECK ((callback_state = ANY (ARRAY['none'::text, 'pending'::text, 'running'::text, 'succeeded'::text, 'failed'::text]))),
    CONSTRAINT batch_counts_nonnegative CHECK (((queued >= 0) AND (running >= 0) AND (succeeded >= 0) AND (failed >= 0) AND (cancelled >= 0))),
    CONSTRAINT batch_counts_sum CHECK ((total = ((((queued + running) + succeeded) + failed) + cancelled))),
    CONSTRAINT batch_has_items CHECK ((total >= 1)),
    CONSTRAINT batch_status_known CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'paused'::text, 'cancelling'::text, 'completed'::text, 'completed_with_errors'::text, 'failed'::text, 'cancelled'::text]))),
    CONSTRAINT batch_terminal_iff_drained CHECK (((status = ANY (ARRAY['completed'::text, 'completed_with_errors'::text, 'failed'::text, 'cancelled'::text])) = ((queued + running) = 0)))
);


-- Name: items; Type: TABLE; Schema: supervisor; Owner: -

CREATE TABLE supervisor.items (
    id bigint NOT NULL,
    batch_id uuid NOT NULL,
    seq integer NOT NULL,
    key text,
    handler text NOT NULL,
    status text DEFAULT 'queued'::text NOT NULL,
    payload jsonb NOT NULL,
    result jsonb,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer NOT NULL,
    run_after timestamp with time zone DEFAULT now() NOT NULL,
    worker text,
    lease uuid,
    errors jsonb DEFAULT '[]'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    finished_version bigint,
    CONSTRAINT item_attempts_nonnegative CHECK ((attempts >= 0)),
    CONSTRAINT item_running_has_lease CHECK (((status = 'running'::text) = (lease IS NOT NULL))),
    CONSTRAINT item_status_known CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'cancelled'::text])))
);


-- Name: items_id_seq; Type: SEQUENCE; Schema: supervisor; Owner: -

ALTER TABLE supervisor.items ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME supervisor.items_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


-- Name: rate_buckets; Type: TABLE; Schema: supervisor; Owner: -

CREATE TABLE supervisor.rate_buckets (
    handler text NOT NULL,
    tokens double precision NOT NULL,
    updated_at timestamp with time zone NOT NULL
);


-- Name: schema_migrations; Type: TABLE; Schema: supervisor; Owner: -

CREATE TABLE supervisor.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);


-- Name: workers; Type: TABLE; Schema: supervisor; Owner: -

CREATE TABLE supervisor.workers (
    id uuid NOT NULL,
    name text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    state text DEFAULT 'running'::text NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT now() NOT NULL,
    in_flight integer DEFAULT 0 NOT NULL,
    concurrency integer NOT NULL,
    CONSTRAINT worker_state_known CHECK ((state = ANY (ARRAY['running'::text, 'draining'::text])))
);


-- Data for Name: batch_events; Type: TABLE DATA; Schema: supervisor; Owner: -



-- Data for Name: batches; Type: TABLE DATA; Schema: supervisor; Owner: -



-- Data for Name: items; Type: TABLE DATA; Schema: supervisor; Owner: -



-- Data for Name: rate_buckets; Type: TABLE DATA; Schema: supervisor; Owner: -



-- Data for Name: schema_migrations; Type: TABLE DATA; Schema: supervisor; Owner: -

INSERT INTO supervisor.schema_migrations VALUES (1, 'initial', '2026-12-03 11:53:18.909064+00');
INSERT INTO supervisor.schema_migrations VALUES (2, 'apply_outcomes_by_id', '2026-12-03 11:53:18.909064+00');
INSERT INTO supervisor.schema_migrations VALUES (3, 'apply_outcomes_hash_join', '2026-12-03 11:53:18.909064+00');
INSERT INTO supervisor.schema_migrations VALUES (4, 'reclaim_message', '2026-12-03 11:53:18.909064+00');


-- Data for Name: workers; Type: TABLE DATA; Schema: supervisor; Owner: -



-- Name: batch_events_id_seq; Type: SEQUENCE SET; Schema: supervisor; Owner: -

SELECT pg_catalog.setval('supervisor.batch_events_id_seq', 1, false);


-- Name: items_id_seq; Type: SEQUENCE SET; Schema: supervisor; Owner: -

SELECT pg_catalog.setval('supervisor.items_id_seq', 1, false);


-- Name: batch_events batch_events_pkey; Type: CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.batch_events
    ADD CONSTRAINT batch_events_pkey PRIMARY KEY (id);


-- Name: batches batches_pkey; Type: CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.batches
    ADD CONSTRAINT batches_pkey PRIMARY KEY (id);


-- Name: items items_pkey; Type: CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.items
    ADD CONSTRAINT items_pkey PRIMARY KEY (id);


-- Name: rate_buckets rate_buckets_pkey; Type: CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.rate_buckets
    ADD CONSTRAINT rate_buckets_pkey PRIMARY KEY (handler);


-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);


-- Name: workers workers_pkey; Type: CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.workers
    ADD CONSTRAINT workers_pkey PRIMARY KEY (id);


-- Name: batch_events_by_batch; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX batch_events_by_batch ON supervisor.batch_events USING btree (batch_id, id);


-- Name: batches_active; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX batches_active ON supervisor.batches USING btree (handler, priority DESC) WHERE (status = ANY (ARRAY['queued'::text, 'running'::text]));


-- Name: batches_callbacks; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX batches_callbacks ON supervisor.batches USING btree (callback_run_after) WHERE (callback_state = ANY (ARRAY['pending'::text, 'running'::text]));


-- Name: batches_finished; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX batches_finished ON supervisor.batches USING btree (finished_at) WHERE (finished_at IS NOT NULL);


-- Name: batches_idempotency; Type: INDEX; Schema: supervisor; Owner: -

CREATE UNIQUE INDEX batches_idempotency ON supervisor.batches USING btree (tenant, idempotency_key) WHERE (idempotency_key IS NOT NULL);


-- Name: batches_listing; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX batches_listing ON supervisor.batches USING btree (tenant, created_at DESC, id DESC);


-- Name: items_by_batch; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX items_by_batch ON supervisor.items USING btree (batch_id, id);


-- Name: items_finished; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX items_finished ON supervisor.items USING btree (batch_id, finished_version) WHERE (finished_version IS NOT NULL);


-- Name: items_key; Type: INDEX; Schema: supervisor; Owner: -

CREATE UNIQUE INDEX items_key ON supervisor.items USING btree (batch_id, key) WHERE (key IS NOT NULL);


-- Name: items_runnable; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX items_runnable ON supervisor.items USING btree (batch_id, run_after, id) WHERE (status = 'queued'::text);


-- Name: items_running; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX items_running ON supervisor.items USING btree (lease, id) WHERE (status = 'running'::text);


-- Name: workers_by_name; Type: INDEX; Schema: supervisor; Owner: -

CREATE INDEX workers_by_name ON supervisor.workers USING btree (name);


-- Name: batch_events batch_events_batch_id_fkey; Type: FK CONSTRAINT; Schema: supervisor; Owner: -

ALTER TABLE ONLY supervisor.batch_events
    ADD CONSTRAINT batch_events_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES supervisor.batches(id) ON DELETE CASCADE;


-- PostgreSQL database dump complete


