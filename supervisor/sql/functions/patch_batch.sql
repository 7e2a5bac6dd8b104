-- patch_batch: change a batch's priority, max_concurrency or max_failures
-- (p_fields names which were given). A batch control: see cancel_batch.sql.
CREATE OR REPLACE FUNCTION @schema.patch_batch(p_batch uuid, p_tenant text, p_actor text,
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
