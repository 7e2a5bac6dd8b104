-- retry_items: queue a chosen set of one batch's items again, for triage: the
-- items named in p_items, or the failed items whose last error has the type
-- p_error_type (both given: the named ones of that type), at most p_limit of
-- them, in id order. Each item goes through retry_item, the one owner of an
-- item's retry: the same fencing (a fresh attempt budget, attempt numbers that
-- keep counting), the same 'item_retried' audit entry and the same conflicts
-- (a queued or running item, a batch being cancelled, a spent failure budget),
-- item by item. The batch row is locked first and the items in id order, the
-- global lock order. Returns one row per chosen item: its id, retry_item's
-- outcome and the item's status before; a single row with o_item NULL and
-- o_outcome 'not_found' when the tenant has no such batch.
CREATE OR REPLACE FUNCTION @schema.retry_items(p_batch uuid, p_items bigint[], p_error_type text,
                                    p_limit integer, p_tenant text, p_actor text)
RETURNS TABLE (o_item bigint, o_outcome text, o_status text)
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    r record;
BEGIN
    PERFORM 1 FROM @schema.batches
     WHERE id = p_batch AND (p_tenant IS NULL OR tenant = p_tenant) FOR UPDATE;
    IF NOT FOUND THEN
        o_outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    FOR v_id IN
        SELECT i.id FROM @schema.items i
         WHERE i.batch_id = p_batch
           AND (p_items IS NULL OR i.id = ANY (p_items))
           AND (p_error_type IS NULL
                OR (i.status = 'failed' AND i.errors <> '[]'
                    AND (i.errors -> -1) ->> 'type' = p_error_type))
         ORDER BY i.id
         LIMIT p_limit
    LOOP
        SELECT * INTO r FROM @schema.retry_item(v_id, p_tenant, p_actor);
        o_item := v_id;
        o_outcome := r.o_outcome;
        o_status := r.o_status;
        RETURN NEXT;
    END LOOP;
END
$$;
