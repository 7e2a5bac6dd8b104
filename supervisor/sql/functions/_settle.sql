-- _settle: the one place a batch row changes. Applies counter deltas, enforces
-- the failure budget, derives the status from the counters (_batch_status),
-- bumps the version once and notifies.
-- Callers hold the batch row lock and have already moved the items.
CREATE OR REPLACE FUNCTION @schema._settle(
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
            b.paused := false;  -- a batch paused, then cancelled, runs when retried
        END IF;  -- a live batch keeps its pause
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
    ELSE
        v_status := @schema._batch_status(b.paused, b.queued, b.running, b.succeeded,
                                          b.failed, b.cancelled, b.stop_reason,
                                          b.started_at IS NOT NULL);
    END IF;
    IF NOT v_was_terminal AND b.queued + b.running = 0 THEN
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
    END IF;

    IF b.started_at IS NULL AND (b.running > 0 OR b.succeeded + b.failed > 0) THEN
        b.started_at := now();
        INSERT INTO @schema.batch_events (batch_id, action, actor) VALUES (p_batch, 'started', p_actor);
    END IF;

    UPDATE @schema.batches SET
        status = v_status, queued = b.queued, running = b.running, succeeded = b.succeeded,
        failed = b.failed, cancelled = b.cancelled, version = v_new_version,
        stop_reason = b.stop_reason, paused = b.paused, started_at = b.started_at,
        finished_at = b.finished_at,
        callback_state = b.callback_state, callback_attempts = b.callback_attempts,
        callback_error = b.callback_error, callback_run_after = b.callback_run_after
    WHERE id = p_batch;
    PERFORM pg_notify('@sname_batch', p_batch::text || ':' || v_new_version::text || ':' || v_status);
END
$$;
