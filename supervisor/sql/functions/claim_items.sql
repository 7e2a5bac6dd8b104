-- claim_items: move up to p_limit runnable items of one handler to running for
-- this worker, committed before any handler runs. Higher priority first; fair
-- across the batches of the top priority; respects pause, per-batch
-- max_concurrency, global_concurrency and rate_limit.
--
-- The cost of a claim does not grow with the number of active batches: the
-- candidates (at most CANDIDATES per claim, each a batch with queued items) come
-- from bounded scans of batches_claimable, starting at a random batch id and
-- wrapping around, so successive claims (and claims of different daemons) visit
-- every batch of the top priority with equal chance instead of sorting them all.
-- Lower priorities fill what the top one leaves. Only as many candidates as the
-- claim can fill are taken; among them, the claim is shared out fewest-running first.
CREATE OR REPLACE FUNCTION @schema.claim_items(
    p_handler text, p_limit integer, p_worker text, p_lease uuid,
    p_global_cap integer, p_rate double precision, p_burst double precision)
RETURNS TABLE (id bigint, batch_id uuid, key text, payload jsonb, attempts integer,
               max_attempts integer, batch_metadata jsonb)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_limit integer := p_limit;
    v_running integer;
    v_tokens double precision;
    v_total integer := 0;
    v_share integer;
    v_take integer;
    v_n integer;
    v_top integer;
    v_k integer;
    v_start uuid;
    v_locked uuid[];
    v_pass integer;
    v_ids bigint[];
    v_keys text[];
    v_payloads jsonb[];
    v_attempts integer[];
    v_max integer[];
    v_last_after timestamptz;
    b record;
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
                SELECT y.part, y.priority, y.id,
                       sum(y.queued) OVER (ORDER BY y.part, y.priority DESC, y.id) - y.queued
                           AS ahead
                  FROM (
                    (SELECT 1 AS part, c.priority, c.id, c.queued FROM @schema.batches c
                      WHERE c.handler = p_handler AND c.status IN ('queued', 'running')
                        AND c.queued > 0 AND c.priority = v_top AND c.id >= v_start
                        AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
                      ORDER BY c.id LIMIT v_k)
                    UNION ALL
                    (SELECT 2, c.priority, c.id, c.queued FROM @schema.batches c
                      WHERE c.handler = p_handler AND c.status IN ('queued', 'running')
                        AND c.queued > 0 AND c.priority = v_top AND c.id < v_start
                        AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
                      ORDER BY c.id LIMIT v_k)
                    UNION ALL
                    (SELECT 3, c.priority, c.id, c.queued FROM @schema.batches c
                      WHERE c.handler = p_handler AND c.status IN ('queued', 'running')
                        AND c.queued > 0 AND c.priority < v_top
                        AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
                      ORDER BY c.priority DESC, c.id LIMIT v_k)
                  ) y
            ) x
            WHERE x.ahead < v_limit
            ORDER BY x.part, x.priority DESC, x.id
            LIMIT v_k)
         ORDER BY bt.id FOR UPDATE) l;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;

    SELECT count(*) INTO v_n FROM @schema.batches c
     WHERE c.id = ANY (v_locked) AND c.priority = v_top;
    v_share := greatest(1, ceil(v_limit::numeric / greatest(1, v_n)))::integer;

    FOR b IN
        SELECT c.id, c.priority, c.max_concurrency, c.running, c.metadata, c.claim_after,
               c.claim_id
          FROM @schema.batches c
         WHERE c.id = ANY (v_locked)
           AND c.handler = p_handler AND c.status IN ('queued', 'running') AND c.queued > 0
           AND (c.max_concurrency IS NULL OR c.running < c.max_concurrency)
         ORDER BY c.priority DESC, c.running, c.created_at
    LOOP
        EXIT WHEN v_total >= v_limit;
        v_take := v_limit - v_total;
        IF b.priority = v_top THEN
            v_take := least(v_take, v_share);
        END IF;
        IF b.max_concurrency IS NOT NULL THEN
            v_take := least(v_take, b.max_concurrency - b.running);
        END IF;
        CONTINUE WHEN v_take <= 0;
        -- Scan from where this batch's last claim stopped: everything before the
        -- cursor was claimed, and its dead index entries are what makes a deep
        -- queue slow; every item queued since (retry, release) got a later
        -- run_after. A short result rescans from the start (pass 2), so an item
        -- left behind the cursor (a claim that rolled back) is never missed.
        v_n := 0;
        FOR v_pass IN 1 .. 2 LOOP
            EXIT WHEN v_n >= v_take OR (v_pass = 2 AND b.claim_after IS NULL);
            WITH picked AS (
                SELECT i.id FROM @schema.items i
                 WHERE i.batch_id = b.id AND i.status = 'queued' AND i.run_after <= now()
                   AND (v_pass = 2 OR b.claim_after IS NULL
                        OR (i.run_after, i.id) > (b.claim_after, b.claim_id))
                 ORDER BY i.run_after, i.id
                 LIMIT v_take - v_n
                 FOR UPDATE SKIP LOCKED
            ), upd AS (
                UPDATE @schema.items i
                   SET status = 'running', attempts = i.attempts + 1, worker = p_worker,
                       lease = p_lease, started_at = now()
                  FROM picked WHERE i.id = picked.id
                RETURNING i.id, i.key, i.payload, i.attempts, i.max_attempts, i.run_after
            )
            SELECT array_agg(upd.id ORDER BY upd.run_after, upd.id),
                   array_agg(upd.key ORDER BY upd.run_after, upd.id),
                   array_agg(upd.payload ORDER BY upd.run_after, upd.id),
                   array_agg(upd.attempts ORDER BY upd.run_after, upd.id),
                   array_agg(upd.max_attempts ORDER BY upd.run_after, upd.id),
                   max(upd.run_after)
              INTO v_ids, v_keys, v_payloads, v_attempts, v_max, v_last_after
              FROM upd;
            CONTINUE WHEN v_ids IS NULL;
            v_n := v_n + cardinality(v_ids);
            IF v_pass = 1 THEN
                UPDATE @schema.batches c SET claim_after = v_last_after,
                       claim_id = v_ids[cardinality(v_ids)]
                 WHERE c.id = b.id;
            END IF;
            RETURN QUERY SELECT x.id, b.id, x.key, x.payload, x.attempts, x.max_attempts,
                                b.metadata
                           FROM unnest(v_ids, v_keys, v_payloads, v_attempts, v_max)
                                AS x (id, key, payload, attempts, max_attempts);
        END LOOP;
        IF v_n > 0 THEN
            v_total := v_total + v_n;
            PERFORM @schema._settle(b.id, -v_n, v_n, 0, 0, 0, p_worker);
        END IF;
    END LOOP;

    IF p_rate IS NOT NULL THEN
        UPDATE @schema.rate_buckets r SET tokens = v_tokens - v_total, updated_at = clock_timestamp()
         WHERE r.handler = p_handler;
    END IF;
END
$$;
