-- retry_item: queue one finished item again, whatever it ended as: failed,
-- cancelled, or succeeded (a rerun, like Oban's retry_job; its result is
-- cleared). The item gets a fresh attempt budget as a batch retry gives
-- (max_attempts grows by the batch's budget; attempt numbers keep counting, so
-- a late write of an earlier attempt stays fenced). A finished batch reopens
-- through _settle(p_reopen) exactly as retry_batch reopens it: its exclusive key
-- is taken back (refused by the index batches_exclusive while another batch
-- holds it), its stop, finish and callback are cleared. An item control: see
-- cancel_item.sql for the shape; a queued or running item is a conflict, as is
-- a retry the batch's failure budget would stop again at once.
CREATE OR REPLACE FUNCTION @schema.retry_item(p_item bigint, p_tenant text, p_actor text,
                                   OUT o_outcome text, OUT o_status text, OUT o_batch uuid)
LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    it @schema.items%ROWTYPE;
    v_batch uuid;
    v_max integer;
BEGIN
    SELECT i.batch_id INTO v_batch FROM @schema.items i WHERE i.id = p_item;
    IF NOT FOUND THEN o_outcome := 'not_found'; RETURN; END IF;
    -- A retry never ends a batch, so a waiting one is locked alone (cancel_item).
    SELECT * INTO b FROM @schema.batches
     WHERE id = v_batch AND (p_tenant IS NULL OR tenant = p_tenant) FOR UPDATE;
    IF NOT FOUND THEN o_outcome := 'not_found'; RETURN; END IF;
    SELECT * INTO it FROM @schema.items WHERE id = p_item FOR UPDATE;
    o_status := it.status;
    o_batch := v_batch;
    IF it.status IN ('queued', 'running') THEN
        o_outcome := 'conflict:item ' || p_item || ' is ' || it.status || ': nothing to retry';
        RETURN;
    END IF;
    IF b.status = 'cancelling' THEN
        o_outcome := 'conflict:batch is being cancelled';
        RETURN;
    END IF;
    -- _settle_batches stops a reopened batch whose failures exceed its budget,
    -- cancelling this very item: refuse instead of answering 'ok' for that.
    IF b.max_failures_limit IS NOT NULL
       AND b.failed - (it.status = 'failed')::integer > b.max_failures_limit THEN
        o_outcome := 'conflict:the batch''s failure budget is spent (' || b.failed
            || ' items failed, max_failures allows ' || b.max_failures_limit
            || '): retry the batch to queue its failed items together';
        RETURN;
    END IF;
    IF b.exclusive_key IS NOT NULL
       AND b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
        -- reopening gives the key a batch that runs (see _exclusive_key_lock)
        PERFORM @schema._exclusive_key_lock(b.tenant, b.exclusive_key);
    END IF;
    UPDATE @schema.items
       SET max_attempts = max_attempts + b.attempt_budget, status = 'queued', run_after = now(),
           result = NULL, finished_at = NULL, finished_version = NULL
     WHERE id = p_item
    RETURNING max_attempts INTO v_max;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (v_batch, 'item_retried', p_actor, jsonb_build_object(
        'item', p_item::text, 'key', it.key, 'status', it.status, 'attempts', it.attempts,
        'max_attempts', v_max));
    PERFORM @schema._settle(v_batch, 1, 0, -(it.status = 'succeeded')::integer,
                            -(it.status = 'failed')::integer,
                            -(it.status = 'cancelled')::integer, p_actor, true);
    PERFORM pg_notify('@sname_wake', b.handler);
    o_outcome := 'ok';
END
$$;
