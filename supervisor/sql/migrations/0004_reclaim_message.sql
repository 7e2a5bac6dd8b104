-- 0004_reclaim_message: a reclaimed attempt's history no longer claims it ran.
-- A daemon claims items a little ahead of its workers, so one that dies may hold
-- attempts whose handler never started; the database cannot tell which. The
-- WorkerLost entry used to say the worker died "while running attempt N"; it now
-- says the attempt was held, and that whether it had started is not known.
-- Signature and results are those of 0001.

CREATE OR REPLACE FUNCTION @schema.reclaim_leases(p_leases uuid[], p_actor text)
RETURNS TABLE (kind text, id text, batch_id uuid, status text, seconds double precision,
               handler text)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_lease uuid;
    v_ids bigint[];
    v_att integer[];
    v_bat uuid[];
    v_err jsonb[];
BEGIN
    UPDATE @schema.batches bt SET callback_state = 'pending', callback_lease = NULL,
           callback_run_after = now(), version = bt.version + 1
     WHERE bt.callback_state = 'running' AND bt.callback_lease = ANY (p_leases);
    FOREACH v_lease IN ARRAY p_leases LOOP
        SELECT array_agg(i.id), array_agg(i.attempts), array_agg(DISTINCT i.batch_id),
               array_agg(jsonb_build_object(
                   'attempt', i.attempts, 'type', 'WorkerLost',
                   'message', format('worker %s stopped heartbeating or restarted while it held '
                                     'attempt %s (claimed; not known whether its handler had '
                                     'started)', coalesce(i.worker, '?'), i.attempts),
                   'traceback', NULL, 'at', now(), 'worker', i.worker))
          INTO v_ids, v_att, v_bat, v_err
          FROM @schema.items i WHERE i.status = 'running' AND i.lease = v_lease;
        CONTINUE WHEN v_ids IS NULL;
        RETURN QUERY SELECT * FROM @schema.apply_outcomes(
            v_lease, v_bat, v_ids, v_att, array_fill('lost'::text, ARRAY[cardinality(v_ids)]),
            array_fill(NULL::jsonb, ARRAY[cardinality(v_ids)]), v_err,
            array_fill(0::double precision, ARRAY[cardinality(v_ids)]), p_actor);
    END LOOP;
END
$$;
