-- retry_batch: queue a finished batch's failed (and, with p_include_cancelled,
-- cancelled) items again. A batch control: see cancel_batch.sql.
CREATE OR REPLACE FUNCTION @schema.retry_batch(p_batch uuid, p_tenant text, p_actor text,
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
    IF b.exclusive_key IS NOT NULL THEN
        -- reopening gives the key a batch that runs (see _exclusive_key_lock)
        PERFORM @schema._exclusive_key_lock(b.tenant, b.exclusive_key);
    END IF;
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
