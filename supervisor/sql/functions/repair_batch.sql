-- repair_batch: doctor --repair. Recompute a batch's counters from its items
-- and re-derive its status with _batch_status in one guarded UPDATE (the CHECKs
-- still hold). A terminal status is re-derived too (stop_reason keeps
-- cancelled/failed-by-budget): keeping the old one could leave 'completed' over
-- items that failed.
CREATE OR REPLACE FUNCTION @schema.repair_batch(p_batch uuid, p_actor text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b @schema.batches%ROWTYPE;
    n integer; q integer; r integer; s integer; f integer; c integer;
    v_status text;
BEGIN
    SELECT * INTO b FROM @schema.batches WHERE id = p_batch FOR UPDATE;
    IF NOT FOUND THEN RETURN 'not_found'; END IF;
    SELECT count(*), count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
      INTO n, q, r, s, f, c FROM @schema.items WHERE batch_id = p_batch;
    IF n = 0 THEN RETURN 'empty'; END IF;
    -- The same rule as _settle, from the recounted items; a batch wrongly terminal
    -- over unfinished items is reopened by it (its old status is not kept).
    v_status := @schema._batch_status(b.waiting AND q + r > 0, b.scheduled AND q + r > 0,
                                      b.paused, q, r, s, f, c,
                                      b.stop_reason, b.started_at IS NOT NULL);
    UPDATE @schema.batches SET
        total = n, queued = q, running = r, succeeded = s, failed = f, cancelled = c,
        status = v_status, version = version + 1,
        finished_at = CASE WHEN q + r = 0 THEN coalesce(finished_at, now()) END
     WHERE id = p_batch;
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    VALUES (p_batch, 'repaired', p_actor, jsonb_build_object(
        'before', jsonb_build_object('status', b.status, 'total', b.total, 'queued', b.queued,
            'running', b.running, 'succeeded', b.succeeded, 'failed', b.failed,
            'cancelled', b.cancelled),
        'after', jsonb_build_object('status', v_status, 'total', n, 'queued', q, 'running', r,
            'succeeded', s, 'failed', f, 'cancelled', c)));
    PERFORM pg_notify('@sname_batch', p_batch::text || ':' || (b.version + 1)::text || ':' || v_status);
    RETURN v_status;
END
$$;
