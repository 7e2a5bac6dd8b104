-- reclaim_leases: items still running under leases that are gone (a dead or
-- restarted worker) go back through apply_outcomes as 'lost', with a WorkerLost
-- error recorded for the attempt; their callbacks go back to pending. A daemon
-- claims a little ahead of its workers, so a dead one may have held attempts
-- whose handler never started; nothing records a start, so the entry says the
-- attempt was held and that whether it had started is not known.
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
