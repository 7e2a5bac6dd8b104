-- patch_batch_v2: change a batch's priority, max_concurrency, max_failures or
-- not_before (p_fields names which were given). A batch control: see
-- cancel_batch.sql. not_before moves only while the batch has not been handed to
-- the claim (scheduled, or waiting for a dependency); NULL or a past time means
-- now. Its queued items' run_after moves with it, so the claim's run_after check
-- and the queue-lag metric agree with the batch.
CREATE OR REPLACE FUNCTION @schema.patch_batch_v2(
    p_batch uuid, p_tenant text, p_actor text, p_fields jsonb, p_priority integer,
    p_max_concurrency integer, p_max_failures jsonb, p_max_failures_limit integer,
    p_not_before timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    v_schedule boolean := p_fields ? 'not_before';
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    IF b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled') THEN
        RETURN 'conflict:batch is already ' || b.status;
    END IF;
    IF v_schedule AND b.status NOT IN ('scheduled', 'waiting') THEN
        RETURN 'conflict:batch is ' || b.status
            || ': not_before can change only while it is scheduled or waiting';
    END IF;
    UPDATE @schema.batches SET
        priority = CASE WHEN p_fields ? 'priority' THEN p_priority ELSE priority END,
        max_concurrency = CASE WHEN p_fields ? 'max_concurrency' THEN p_max_concurrency
                               ELSE max_concurrency END,
        max_failures = CASE WHEN p_fields ? 'max_failures' THEN p_max_failures ELSE max_failures END,
        max_failures_limit = CASE WHEN p_fields ? 'max_failures' THEN p_max_failures_limit
                                  ELSE max_failures_limit END,
        not_before = CASE WHEN v_schedule THEN p_not_before ELSE not_before END,
        scheduled = CASE WHEN v_schedule THEN coalesce(p_not_before > now(), false)
                         ELSE scheduled END
     WHERE id = p_batch;
    IF v_schedule THEN
        UPDATE @schema.items SET run_after = greatest(coalesce(p_not_before, now()), now())
         WHERE batch_id = p_batch AND status = 'queued';
        PERFORM pg_notify('@sname_schedule', '');
    END IF;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'updated', p_actor, p_fields);
    PERFORM @schema._settle(p_batch, 0, 0, 0, 0, 0, p_actor);
    PERFORM pg_notify('@sname_wake', b.handler);
    RETURN 'ok';
END
$$;
