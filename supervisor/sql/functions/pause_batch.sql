-- pause_batch: pause (p_pause) or resume a batch. A batch control: see cancel_batch.sql.
CREATE OR REPLACE FUNCTION @schema.pause_batch(p_batch uuid, p_tenant text, p_actor text, p_pause boolean)
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
    IF p_pause = b.paused THEN RETURN 'ok'; END IF;
    -- The flag is the control's input; _settle derives the status from it.
    UPDATE @schema.batches SET paused = p_pause WHERE id = p_batch;
    IF p_pause THEN
        -- daemons hand back claimed items that have not started yet
        PERFORM pg_notify('@sname_control', 'pause:' || p_batch::text);
    ELSE
        PERFORM pg_notify('@sname_wake', b.handler);
    END IF;
    INSERT INTO @schema.batch_events (batch_id, action, actor)
    VALUES (p_batch, CASE WHEN p_pause THEN 'paused' ELSE 'resumed' END, p_actor);
    PERFORM @schema._settle(p_batch, 0, 0, 0, 0, 0, p_actor);
    RETURN 'ok';
END
$$;
