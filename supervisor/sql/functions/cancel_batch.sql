-- cancel_batch: stop a batch. Like every batch control (pause_batch,
-- retry_batch, patch_batch), it returns 'ok', 'not_found' or 'conflict:<reason>'; the
-- batch row is locked first (the global lock order) and every change goes
-- through _settle so counters, status and version move together. A waiting batch
-- (no running items) is cancelled at once.
CREATE OR REPLACE FUNCTION @schema.cancel_batch(p_batch uuid, p_tenant text, p_actor text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    v_n integer;
BEGIN
    -- Cancelling a waiting batch ends it, which cancels the batches waiting for
    -- it (_settle_batches). It is locked together with them, in id order: the
    -- order in which a settle that ends one of its dependencies locks them all
    -- (see the lock order there). Locking it alone first could deadlock with that.
    IF EXISTS (SELECT 1 FROM @schema.batches WHERE id = p_batch AND status = 'waiting') THEN
        PERFORM count(*) FROM (
            SELECT bt.id FROM @schema.batches bt
             WHERE bt.id = ANY (p_batch || @schema._waiting_dependents(ARRAY[p_batch]))
               AND bt.status = 'waiting'
             ORDER BY bt.id FOR UPDATE) l;
    END IF;
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
