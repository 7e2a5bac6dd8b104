-- cancel_item: cancel one queued or running item. An item control, built like
-- the batch controls (cancel_batch.sql): the item's batch row is locked first
-- (the global lock order), the item moves, the batch's audit log gets an entry,
-- and _settle moves the counters and derives the status in this transaction (the
-- batch's last open item finalizes it). A running item's lease is cleared: the
-- attempt still running on its daemon is fenced (apply_outcomes needs lease and
-- attempt to match), and its daemon is told to stop it ('cancel_item:<id>:<attempt>' on
-- the control channel, with the attempt, so a later attempt is left alone). An item already cancelled answers 'ok' (idempotent);
-- succeeded or failed is a conflict.
-- Returns o_outcome 'ok', 'not_found' or 'conflict:<reason>', the item's status
-- before (o_status) and its batch (o_batch), or NULLs when not found.
CREATE OR REPLACE FUNCTION @schema.cancel_item(p_item bigint, p_tenant text, p_actor text,
                                    OUT o_outcome text, OUT o_status text, OUT o_batch uuid)
LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    it @schema.items%ROWTYPE;
    v_batch uuid;
BEGIN
    SELECT i.batch_id INTO v_batch FROM @schema.items i WHERE i.id = p_item;
    IF NOT FOUND THEN o_outcome := 'not_found'; RETURN; END IF;
    -- Cancelling the last open item of a waiting batch ends it, which judges the
    -- batches waiting for it: lock them together in id order, as cancel_batch.
    IF EXISTS (SELECT 1 FROM @schema.batches WHERE id = v_batch AND status = 'waiting') THEN
        PERFORM count(*) FROM (
            SELECT bt.id FROM @schema.batches bt
             WHERE bt.id = ANY (v_batch || @schema._waiting_dependents(ARRAY[v_batch]))
               AND bt.status = 'waiting'
             ORDER BY bt.id FOR UPDATE) l;
    END IF;
    SELECT * INTO b FROM @schema.batches
     WHERE id = v_batch AND (p_tenant IS NULL OR tenant = p_tenant) FOR UPDATE;
    IF NOT FOUND THEN o_outcome := 'not_found'; RETURN; END IF;
    -- Every writer of items holds their batch's lock: the item cannot move now.
    SELECT * INTO it FROM @schema.items WHERE id = p_item FOR UPDATE;
    o_status := it.status;
    o_batch := v_batch;
    IF it.status = 'cancelled' THEN o_outcome := 'ok'; RETURN; END IF;
    IF it.status IN ('succeeded', 'failed') THEN
        o_outcome := 'conflict:item ' || p_item || ' is already ' || it.status;
        RETURN;
    END IF;
    UPDATE @schema.items SET status = 'cancelled', lease = NULL, finished_at = now(),
           finished_version = b.version + 1
     WHERE id = p_item;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (v_batch, 'item_cancelled', p_actor, jsonb_build_object(
        'item', p_item::text, 'key', it.key, 'status', it.status, 'attempt', it.attempts));
    PERFORM @schema._settle(v_batch, -(it.status = 'queued')::integer,
                            -(it.status = 'running')::integer, 0, 0, 1, p_actor);
    IF it.status = 'running' THEN
        PERFORM pg_notify('@sname_control', 'cancel_item:' || p_item::text || ':' || it.attempts);
    END IF;
    o_outcome := 'ok';
END
$$;
