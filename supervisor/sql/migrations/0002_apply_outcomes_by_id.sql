-- 0002_apply_outcomes_by_id: the outcome write looks its items up by (lease, id).
-- A daemon keeps one lease for its whole life, and `items_running` keeps a dead
-- entry for every item claimed since the last vacuum; apply_outcomes found its rows
-- by scanning all of its lease's entries, so a write's cost grew with the daemon's
-- history: in a 1,000,000-item batch 42 buffer reads per item instead of 16, and
-- half the throughput (bench/README.md). Indexing (lease, id) and naming the ids
-- lets each write probe exactly its items. Otherwise apply_outcomes is as in 0001.

DROP INDEX @schema.items_running;
CREATE INDEX items_running ON @schema.items (lease, id) WHERE status = 'running';

CREATE OR REPLACE FUNCTION @schema.apply_outcomes(
    p_lease uuid, p_batches uuid[], p_ids bigint[], p_attempts integer[], p_outcomes text[],
    p_results jsonb[], p_errors jsonb[], p_delays double precision[], p_actor text)
RETURNS TABLE (kind text, id text, batch_id uuid, status text, seconds double precision,
               handler text)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_applied bigint[];
    v_other bigint[];
    v_bid uuid[];
    v_n integer[];
    v_nq integer[];
    v_ns integer[];
    v_nf integer[];
    v_nc integer[];
    s record;
    i integer;
BEGIN
    PERFORM 1 FROM @schema.batches bt WHERE bt.id = ANY (p_batches) ORDER BY bt.id FOR UPDATE;

    -- Final outcomes (succeeded, failed, cancelled) need no decision: one plain
    -- fenced UPDATE, the hot path. Retry, lost and released go through the
    -- decision below (attempts left? batch stopping?).
    WITH u AS (
        SELECT * FROM unnest(p_ids, p_attempts, p_outcomes, p_results, p_errors, p_delays)
                      AS u (id, attempt, outcome, result, error, delay)
    ), upd AS (
        UPDATE @schema.items it SET
            status = CASE
                WHEN u.outcome IN ('succeeded', 'failed', 'cancelled') THEN u.outcome
                WHEN bt.stop_reason IS NOT NULL THEN 'cancelled'
                WHEN u.outcome = 'released' THEN 'queued'
                WHEN it.attempts >= it.max_attempts THEN 'failed'
                ELSE 'queued' END,
            result = CASE WHEN u.outcome = 'succeeded' THEN u.result ELSE it.result END,
            errors = CASE WHEN u.error IS NULL THEN it.errors
                          ELSE it.errors || jsonb_build_array(u.error) END,
            max_attempts = it.max_attempts + (u.outcome = 'released')::integer,
            run_after = now() + make_interval(secs => coalesce(u.delay, 0)),
            lease = NULL,
            finished_at = now(),
            finished_version = bt.version + 1
          FROM u, @schema.batches bt
         WHERE it.status = 'running' AND it.lease = p_lease AND it.id = ANY (p_ids)
           AND it.id = u.id
           AND it.attempts = u.attempt AND bt.id = it.batch_id
        RETURNING it.id, it.batch_id, it.status, it.handler, u.outcome
    ), per_batch AS (
        SELECT upd.batch_id AS bid, count(*)::integer AS n,
               (count(*) FILTER (WHERE upd.status = 'queued'))::integer AS nq,
               (count(*) FILTER (WHERE upd.status = 'succeeded'))::integer AS ns,
               (count(*) FILTER (WHERE upd.status = 'failed'))::integer AS nf,
               (count(*) FILTER (WHERE upd.status = 'cancelled'))::integer AS nc
          FROM upd GROUP BY upd.batch_id
    )
    SELECT (SELECT array_agg(upd.id) FROM upd),
           (SELECT array_agg(upd.id) FROM upd WHERE upd.outcome <> 'succeeded'),
           array_agg(pb.bid ORDER BY pb.bid), array_agg(pb.n ORDER BY pb.bid),
           array_agg(pb.nq ORDER BY pb.bid), array_agg(pb.ns ORDER BY pb.bid),
           array_agg(pb.nf ORDER BY pb.bid), array_agg(pb.nc ORDER BY pb.bid)
      INTO v_applied, v_other, v_bid, v_n, v_nq, v_ns, v_nf, v_nc
      FROM per_batch pb;

    IF v_applied IS NULL OR cardinality(v_applied) < cardinality(p_ids) THEN
        RETURN QUERY SELECT 'fenced'::text, x.id::text, NULL::uuid, NULL::text,
                            NULL::double precision, NULL::text
                       FROM unnest(p_ids) AS x (id)
                      WHERE v_applied IS NULL OR x.id <> ALL (v_applied);
    END IF;
    IF v_applied IS NULL THEN
        RETURN;
    END IF;

    -- queued items are not finished: clear what the hot UPDATE set for everyone
    UPDATE @schema.items it SET finished_at = NULL, finished_version = NULL
     WHERE it.id = ANY (v_other) AND it.status = 'queued';

    FOR i IN 1 .. cardinality(v_bid) LOOP
        s := @schema._settle(v_bid[i], v_nq[i], -v_n[i], v_ns[i], v_nf[i], v_nc[i], p_actor);
        IF s.o_finished IS NOT NULL THEN
            RETURN QUERY SELECT 'batch'::text, v_bid[i]::text, v_bid[i], s.o_finished,
                                s.o_seconds, NULL::text;
        END IF;
    END LOOP;
    IF v_other IS NOT NULL THEN
        RETURN QUERY SELECT 'item'::text, it.id::text, it.batch_id, it.status,
                            NULL::double precision, it.handler
                       FROM @schema.items it WHERE it.id = ANY (v_other);
    END IF;
END
$$;
