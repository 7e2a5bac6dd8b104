-- claim_items: move up to p_limit runnable items of one handler to running for
-- this worker, committed before any handler runs. Higher priority first; fair
-- across the batches of the top priority; respects pause, per-batch
-- max_concurrency, global_concurrency and rate_limit.
--
-- The cost of a claim does not grow with the number of active batches: the
-- candidates come from bounded scans of batches_claimable, starting at a random
-- batch id and wrapping around, instead of sorting them all. The first LOOKAHEAD
-- (at least; as many as the claim has slots, up to CANDIDATES) batches found are
-- ordered fewest running first, then least recently claimed (claimed_at, never
-- claimed first), and only as many of them as the claim can fill are taken, the
-- claim shared out in that order. So the batches of one handler are served in
-- turn: up to LOOKAHEAD of them exactly round robin, whatever their ids, and a
-- claim for one free slot goes to the batch that waited longest, not to whichever
-- id follows the random start (the batch after a wide gap of ids won most such
-- claims, and of several equal batches one could wait until the others ended).
-- Lower priorities fill what the top one leaves.
CREATE OR REPLACE FUNCTION @schema.claim_items(
    p_handler text, p_limit integer, p_worker text, p_lease uuid,
    p_global_cap integer, p_rate double precision, p_burst double precision)
RETURNS TABLE (id bigint, batch_id uuid, key text, payload jsonb, attempts integer,
               max_attempts integer, batch_metadata jsonb)
-- No plan_cache_mode setting: its parameters are scalars, and every statement's
-- best plan (index scans of batches_claimable and items_runnable, primary-key
-- probes of its few batches) does not depend on their values, so PL/pgSQL may
-- keep generic plans. Planning each statement on every call was about a
-- quarter of a claim's time (pg_stat_statements over many one-item batches).
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_limit integer := p_limit;
    v_running integer;
    v_tokens double precision;
    v_total integer := 0;
    v_share integer;
    v_n integer;
    v_top integer;
    v_k integer;
    v_w integer;
    v_start uuid;
    v_locked uuid[];
    v_pass integer;
    -- the allocation, in fairness order: batch, items to take, its claim cursor
    v_bids uuid[];
    v_takes integer[];
    v_after timestamptz[];
    v_aid bigint[];
    v_meta jsonb[];
    v_pass_bids uuid[];
    v_pass_takes integer[];
    -- the claimed items, and the pass that found each
    v_ids bigint[];
    v_items_batch uuid[];
    v_keys text[];
    v_payloads jsonb[];
    v_attempts integer[];
    v_max integer[];
    v_run_after timestamptz[];
    v_passes integer[];
BEGIN
    IF p_global_cap IS NOT NULL OR p_rate IS NOT NULL THEN
        -- Serialise claims of this handler across daemons so the caps hold.
        PERFORM pg_advisory_xact_lock(hashtext('@sname:claim:' || p_handler));
    END IF;
    IF p_global_cap IS NOT NULL THEN
        SELECT count(*) INTO v_running FROM @schema.items i
         WHERE i.status = 'running' AND i.handler = p_handler;
        v_limit := least(v_limit, p_global_cap - v_running);
    END IF;
    IF p_rate IS NOT NULL THEN
        INSERT INTO @schema.rate_buckets AS r (handler, tokens, updated_at)
        VALUES (p_handler, p_burst, clock_timestamp()) ON CONFLICT (handler) DO NOTHING;
        SELECT least(p_burst, r.tokens + extract(epoch FROM clock_timestamp() - r.updated_at) * p_rate)
          INTO v_tokens FROM @schema.rate_buckets r WHERE r.handler = p_handler;
        v_limit := least(v_limit, floor(v_tokens)::integer);
    END IF;
    IF v_limit <= 0 THEN
        RETURN;
    END IF;

    SELECT c.priority INTO v_top FROM @schema.batches c
     WHERE c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
     ORDER BY c.priority DESC LIMIT 1;
    IF v_top IS NULL THEN
        RETURN;
    END IF;
    v_k := least(v_limit, 256);  -- CANDIDATES: batches a claim may take items from
    v_w := greatest(v_k, 16);  -- LOOKAHEAD: batches a claim chooses them among
    v_start := gen_random_uuid();

    -- Lock the candidate batches in id order (the global lock order), then read
    -- their current counters and allocate in priority/fairness order. Only the
    -- batches locked here are claimed from: the allocation query runs on a newer
    -- snapshot and may see other batches (resumed, submitted, reordered by another
    -- claim meanwhile), whose rows _settle must not write without their lock.
    SELECT array_agg(l.id) INTO v_locked FROM (
        SELECT bt.id FROM @schema.batches bt
         WHERE bt.id IN (
            SELECT x.id FROM (
                -- Only as many batches as the claim can fill: a batch joins while
                -- the queued items of those before it are fewer than the limit, so
                -- ten-item batches give all ten to one claim instead of two each
                -- to five times as many (each batch costs a claim its own writes).
                SELECT v.priority, v.running, v.claimed_at, v.id,
                       sum(v.queued) OVER (ORDER BY v.priority DESC, v.running,
                                                    v.claimed_at NULLS FIRST, v.id)
                           - v.queued AS ahead
                  FROM (
                    -- the lookahead: the first batches from the random start
                    SELECT y.* FROM (
                        (SELECT 1 AS part, c.priority, c.id, c.queued, c.running,
                                c.claimed_at FROM @schema.batches c
                          WHERE c.handler = p_handler AND c.status IN ('queued', 'running')
                            AND c.queued > 0 AND c.priority = v_top AND c.id >= v_start
                            AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
                          ORDER BY c.id LIMIT v_w)
                        UNION ALL
                        (SELECT 2, c.priority, c.id, c.queued, c.running, c.claimed_at
                           FROM @schema.batches c
                          WHERE c.handler = p_handler AND c.status IN ('queued', 'running')
                            AND c.queued > 0 AND c.priority = v_top AND c.id < v_start
                            AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
                          ORDER BY c.id LIMIT v_w)
                        UNION ALL
                        (SELECT 3, c.priority, c.id, c.queued, c.running, c.claimed_at
                           FROM @schema.batches c
                          WHERE c.handler = p_handler AND c.status IN ('queued', 'running')
                            AND c.queued > 0 AND c.priority < v_top
                            AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
                          ORDER BY c.priority DESC, c.id LIMIT v_w)
                      ) y
                     ORDER BY y.part, y.priority DESC, y.id
                     LIMIT v_w
                  ) v
            ) x
            WHERE x.ahead < v_limit
            ORDER BY x.priority DESC, x.running, x.claimed_at NULLS FIRST, x.id
            LIMIT v_k)
         ORDER BY bt.id FOR UPDATE) l;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;

    SELECT count(*) INTO v_n FROM @schema.batches c
     WHERE c.id = ANY (v_locked) AND c.priority = v_top;
    v_share := greatest(1, ceil(v_limit::numeric / greatest(1, v_n)))::integer;

    -- Allocate: fewest running first (then least recently claimed); a top-priority batch gets at
    -- most its share, lower priorities what is left; nobody more than it has
    -- queued or its max_concurrency allows, and all together at most the limit.
    SELECT array_agg(a.id ORDER BY a.ord), array_agg(a.take ORDER BY a.ord),
           array_agg(a.claim_after ORDER BY a.ord), array_agg(a.claim_id ORDER BY a.ord),
           array_agg(a.metadata ORDER BY a.ord)
      INTO v_bids, v_takes, v_after, v_aid, v_meta
      FROM (
        SELECT w.id, w.ord, w.claim_after, w.claim_id, w.metadata,
               least(w.want, v_limit - coalesce(sum(w.want) OVER (
                   ORDER BY w.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)) AS take
          FROM (
            SELECT c.id, c.claim_after, c.claim_id, c.metadata,
                   least(CASE WHEN c.priority = v_top THEN v_share ELSE v_limit END,
                         coalesce(c.max_concurrency - c.running, v_limit), c.queued) AS want,
                   row_number() OVER (ORDER BY c.priority DESC, c.running,
                                      c.claimed_at NULLS FIRST, c.created_at, c.id) AS ord
              FROM @schema.batches c
             WHERE c.id = ANY (v_locked)
               AND c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
               AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
          ) w
      ) a
     WHERE a.take > 0;
    IF v_bids IS NULL THEN
        RETURN;
    END IF;

    -- One statement claims from every allocated batch. Each batch is scanned from
    -- where its last claim stopped: everything before the cursor was claimed, and
    -- its dead index entries are what makes a deep queue slow; every item queued
    -- since (retry, release) got a later run_after. The batches a scan left short
    -- are rescanned from the start (pass 2), so an item left behind the cursor (a
    -- claim that rolled back) is never missed.
    v_pass_bids := v_bids;
    v_pass_takes := v_takes;
    FOR v_pass IN 1 .. 2 LOOP
        WITH a AS (
            SELECT * FROM unnest(v_pass_bids, v_pass_takes,
                                 CASE WHEN v_pass = 1 THEN v_after END,
                                 CASE WHEN v_pass = 1 THEN v_aid END)
                          AS a (id, take, claim_after, claim_id)
        ), picked AS (
            SELECT p.id FROM a CROSS JOIN LATERAL (
                SELECT i.id FROM @schema.items i
                 WHERE i.batch_id = a.id AND i.status = 'queued' AND i.run_after <= now()
                   AND (i.run_after, i.id) > (coalesce(a.claim_after, '-infinity'::timestamptz),
                                              coalesce(a.claim_id, 0))
                 ORDER BY i.run_after, i.id
                 LIMIT a.take
                 FOR UPDATE SKIP LOCKED) p
        ), upd AS (
            UPDATE @schema.items i
               SET status = 'running', attempts = i.attempts + 1, worker = p_worker,
                   lease = p_lease, started_at = now()
              FROM picked WHERE i.id = picked.id
            RETURNING i.id, i.batch_id, i.key, i.payload, i.attempts, i.max_attempts,
                      i.run_after
        )
        SELECT v_ids || array_agg(upd.id), v_items_batch || array_agg(upd.batch_id),
               v_keys || array_agg(upd.key), v_payloads || array_agg(upd.payload),
               v_attempts || array_agg(upd.attempts), v_max || array_agg(upd.max_attempts),
               v_run_after || array_agg(upd.run_after), v_passes || array_agg(v_pass)
          INTO v_ids, v_items_batch, v_keys, v_payloads, v_attempts, v_max, v_run_after,
               v_passes
          FROM upd;
        EXIT WHEN v_pass = 2;
        -- The batches with a cursor whose scan came back short go round again.
        SELECT array_agg(a.id), array_agg(a.take - coalesce(g.n, 0))
          INTO v_pass_bids, v_pass_takes
          FROM unnest(v_bids, v_takes, v_after) AS a (id, take, claim_after)
          LEFT JOIN (SELECT x.b, count(*)::integer AS n FROM unnest(v_items_batch) AS x (b)
                      GROUP BY x.b) g ON g.b = a.id
         WHERE a.claim_after IS NOT NULL AND a.take > coalesce(g.n, 0);
        EXIT WHEN v_pass_bids IS NULL;
    END LOOP;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    v_total := cardinality(v_ids);

    -- Counters, status, 'started' events and the new cursors (where pass 1 stopped
    -- in each batch), all batches in one go.
    PERFORM @schema._settle_batches(
        array_agg(g.b ORDER BY g.b), array_agg(-g.n ORDER BY g.b), array_agg(g.n ORDER BY g.b),
        array_fill(0, ARRAY[count(*)::integer]), array_fill(0, ARRAY[count(*)::integer]),
        array_fill(0, ARRAY[count(*)::integer]), p_worker, false,
        array_agg(g.last_after ORDER BY g.b), array_agg(g.last_id ORDER BY g.b))
       FROM (SELECT x.b, count(*)::integer AS n,
                    (array_agg(x.ra ORDER BY x.ra DESC, x.id DESC)
                        FILTER (WHERE x.pass = 1))[1] AS last_after,
                    (array_agg(x.id ORDER BY x.ra DESC, x.id DESC)
                        FILTER (WHERE x.pass = 1))[1] AS last_id
               FROM unnest(v_items_batch, v_run_after, v_ids, v_passes) AS x (b, ra, id, pass)
              GROUP BY x.b) g;

    RETURN QUERY SELECT x.id, x.b, x.key, x.payload, x.attempts, x.max_attempts, f.metadata
                   FROM unnest(v_ids, v_items_batch, v_keys, v_payloads, v_attempts, v_max,
                               v_run_after)
                        AS x (id, b, key, payload, attempts, max_attempts, ra)
                   JOIN unnest(v_bids, v_meta) WITH ORDINALITY AS f (id, metadata, ord)
                     ON f.id = x.b
                  ORDER BY f.ord, x.ra, x.id;

    IF p_rate IS NOT NULL THEN
        UPDATE @schema.rate_buckets r SET tokens = v_tokens - v_total, updated_at = clock_timestamp()
         WHERE r.handler = p_handler;
    END IF;
END
$$;
