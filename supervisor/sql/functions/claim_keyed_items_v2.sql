-- claim_keyed_items_v2: claim_keyed_items with a budget per key, returning
-- besides each claimed item its limit key, how long it waited (from when it
-- became runnable, run_after, to this claim: the limit-wait metrics) and what
-- it was charged against its key's budget, in which period.
--
-- The budget: at most p_budget cost units started per key per period of
-- p_budget_period seconds (fixed periods counted from the Unix epoch, so every
-- daemon has the same ones; key_budgets holds each key's current period and what
-- it used). An item's cost is the number at p_cost_path in its payload (1
-- without one, or without p_cost_path; anything but a number >= 0 was refused at
-- submission and counts as 1 here). Within a key, items start in turn while
-- their running total fits what is left; the first one that does not fit holds
-- back those behind it (no overtaking: a big item is never starved by small
-- ones). An item alone costing more than the whole budget starts as the first
-- item of a period no cost has been charged to yet, and uses that period up.
-- The daemon corrects a key's charge when its handler reports the actual cost
-- (correct_key_budgets), for the period that charged it, if still current.
--
-- claim_items for a handler with a key limit (key_limit in
-- its configuration): besides pause, a batch's max_concurrency, the handler's
-- global_concurrency and rate_limit, at most p_key_cap items run per limit key
-- and at most p_key_rate start per second per key (a token bucket per key,
-- key_rate_buckets), across every daemon. Handlers without a key limit keep
-- claim_items: nothing here is on their path.
--
-- Fair across keys: the claim walks the keys that have queued items in key order,
-- starting after the key where the handler's last claim stopped (key_cursors)
-- and wrapping around, at most KEYS keys per claim; each key with room gets a
-- share (its first items first, round-robin: every key's first item before any
-- key's second), so a key with a deep backlog never holds back another key.
-- Within a key, items start in run_after and id order (submission order);
-- priority orders the candidates of equal turn.
--
-- Claims of one handler are serialised (the same advisory lock as claim_items
-- takes for its global caps): the per-key running counts and buckets read here
-- hold until commit, since only claims make items running. A key's slot is freed
-- by whatever moves its item out of running (outcome, reclaim, release), with no
-- counter to keep: the count comes from the items_key_running index.
--
-- A throttled key (a row of key_throttles whose throttled_until is still ahead:
-- its handler said the remote side pushes back) is walked like any other key but
-- gets no room, one primary-key probe per key visited; the cursor moves past it.
CREATE OR REPLACE FUNCTION @schema.claim_keyed_items_v2(
    p_handler text, p_limit integer, p_worker text, p_lease uuid,
    p_global_cap integer, p_rate double precision, p_burst double precision,
    p_key_cap integer, p_key_rate double precision, p_key_burst double precision,
    p_budget double precision, p_budget_period double precision, p_cost_path text[])
RETURNS TABLE (id bigint, batch_id uuid, key text, payload jsonb, attempts integer,
               max_attempts integer, batch_metadata jsonb, limit_key text,
               waited_s double precision, cost double precision,
               budget_period_start timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_limit integer := p_limit;
    v_running integer;
    v_tokens double precision;
    v_now timestamptz;
    v_visit integer;
    v_cursor text;
    v_last text;
    v_share integer;
    v_n integer;
    v_pass integer;
    v_n_cand integer := 0;
    v_got integer[];  -- candidates found per key by pass 1
    v_total integer;
    -- the keys visited, in turn order, and what each may start now
    v_keys text[];
    v_free integer[];
    v_key_tokens double precision[];
    v_budget_left double precision[];  -- of each key's budget this period (NULL: no budget)
    v_fresh boolean[];  -- nothing charged to the key's budget this period yet
    v_period timestamptz;  -- the budget period now
    -- the candidates, in claim order
    v_cids bigint[];
    v_cbatch uuid[];
    v_locked uuid[];
    -- the claimed items
    v_ids bigint[];
    v_items_batch uuid[];
    v_items_key text[];
    v_items_cost double precision[];
    v_ord bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('@sname:claim:' || p_handler));
    -- The buckets' clock is read under the lock: a claim that waited for it must
    -- not date its bucket writes before those of the claim it waited for.
    v_now := clock_timestamp();
    IF p_budget IS NOT NULL THEN
        v_period := to_timestamp(floor(extract(epoch FROM v_now) / p_budget_period)
                                 * p_budget_period);
    END IF;
    IF p_global_cap IS NOT NULL THEN
        SELECT count(*) INTO v_running FROM @schema.items i
         WHERE i.status = 'running' AND i.handler = p_handler;
        v_limit := least(v_limit, p_global_cap - v_running);
    END IF;
    IF p_rate IS NOT NULL THEN
        INSERT INTO @schema.rate_buckets AS r (handler, tokens, updated_at)
        VALUES (p_handler, p_burst, v_now) ON CONFLICT (handler) DO NOTHING;
        SELECT least(p_burst, r.tokens + extract(epoch FROM v_now - r.updated_at) * p_rate)
          INTO v_tokens FROM @schema.rate_buckets r WHERE r.handler = p_handler;
        v_limit := least(v_limit, floor(v_tokens)::integer);
    END IF;
    IF v_limit <= 0 THEN
        RETURN;
    END IF;
    v_visit := least(2 * v_limit + 16, 512);  -- KEYS: the keys one claim looks at
    SELECT c.last_key INTO v_cursor FROM @schema.key_cursors c WHERE c.handler = p_handler;

    -- The keys with queued items, in turn order: those after the cursor, then from
    -- the first key round to the cursor; one index probe each (a skip scan of
    -- items_key_runnable), stopping after KEYS. For each: its free slots (key cap
    -- minus its running items) and its tokens (refilled up to the burst), both as
    -- of now, under the lock.
    SELECT array_agg(w.k ORDER BY w.ord), array_agg(w.free ORDER BY w.ord),
           array_agg(w.tokens ORDER BY w.ord), array_agg(p_budget - w.used ORDER BY w.ord),
           array_agg(w.used <= 0 ORDER BY w.ord)
      INTO v_keys, v_free, v_key_tokens, v_budget_left, v_fresh
      FROM (
        SELECT v.k, v.ord, t.tokens, g.used,
               least(v_limit,
                     CASE WHEN p_key_cap IS NULL THEN v_limit
                          ELSE p_key_cap - (SELECT count(*)::integer FROM @schema.items r
                                             WHERE r.handler = p_handler AND r.limit_key = v.k
                                               AND r.status = 'running') END,
                     CASE WHEN p_key_rate IS NULL THEN v_limit
                          ELSE floor(t.tokens)::integer END,
                     -- a key whose budget this period is spent has no room
                     CASE WHEN g.used >= p_budget THEN 0 ELSE v_limit END,
                     -- a throttled key (key_throttles) has no room until its time
                     CASE WHEN EXISTS (SELECT 1 FROM @schema.key_throttles th
                                        WHERE th.handler = p_handler AND th.limit_key = v.k
                                          AND th.throttled_until > v_now) THEN 0
                          ELSE v_limit END) AS free
          FROM (
            WITH RECURSIVE walk (k, ord, wrapped) AS (
                SELECT CASE WHEN a.k IS NOT NULL THEN a.k
                            ELSE (SELECT i.limit_key FROM @schema.items i
                                   WHERE i.handler = p_handler AND i.status = 'queued'
                                     AND i.limit_key IS NOT NULL
                                   ORDER BY i.limit_key LIMIT 1) END,
                       1::bigint, a.k IS NULL
                  FROM (SELECT (SELECT i.limit_key FROM @schema.items i
                                 WHERE i.handler = p_handler AND i.status = 'queued'
                                   AND i.limit_key IS NOT NULL AND i.limit_key > v_cursor
                                 ORDER BY i.limit_key LIMIT 1) AS k) a
                UNION ALL
                SELECT CASE WHEN y.nxt IS NOT NULL THEN y.nxt
                            WHEN NOT w.wrapped THEN (
                                SELECT i.limit_key FROM @schema.items i
                                 WHERE i.handler = p_handler AND i.status = 'queued'
                                   AND i.limit_key IS NOT NULL
                                 ORDER BY i.limit_key LIMIT 1) END,
                       w.ord + 1, w.wrapped OR y.nxt IS NULL
                  FROM walk w
                 CROSS JOIN LATERAL (
                    SELECT (SELECT i.limit_key FROM @schema.items i
                             WHERE i.handler = p_handler AND i.status = 'queued'
                               AND i.limit_key IS NOT NULL AND i.limit_key > w.k
                             ORDER BY i.limit_key LIMIT 1) AS nxt) y
                 WHERE w.k IS NOT NULL AND w.ord < v_visit
                   AND (w.wrapped AND w.k >= v_cursor) IS NOT TRUE  -- round to the cursor: done
            )
            SELECT w.k, w.ord FROM walk w
             WHERE w.k IS NOT NULL AND (w.wrapped AND w.k > v_cursor) IS NOT TRUE
          ) v
          CROSS JOIN LATERAL (
            SELECT CASE WHEN p_key_rate IS NULL THEN NULL
                        ELSE coalesce((SELECT least(p_key_burst, b.tokens + extract(
                                                 epoch FROM v_now - b.updated_at) * p_key_rate)
                                         FROM @schema.key_rate_buckets b
                                        WHERE b.handler = p_handler AND b.limit_key = v.k),
                                      p_key_burst) END AS tokens
          ) t
          CROSS JOIN LATERAL (
            SELECT CASE WHEN p_budget IS NULL THEN NULL
                        ELSE coalesce((SELECT kb.used FROM @schema.key_budgets kb
                                        WHERE kb.handler = p_handler AND kb.limit_key = v.k
                                          AND kb.period_start = v_period), 0) END AS used
          ) g
      ) w;
    IF v_keys IS NULL THEN
        RETURN;  -- no key has queued items
    END IF;
    v_last := v_keys[cardinality(v_keys)];

    -- Each key with room gets a share of the claim (pass 1), and the keys that had
    -- more than their share fill what the others left (pass 2). Candidates are
    -- ordered by turn: their rank within their key, then priority, then key order.
    SELECT count(*) INTO v_n FROM unnest(v_free) AS f (free) WHERE f.free > 0;
    IF v_n > 0 THEN
        v_share := ceil(v_limit::numeric / v_n)::integer;
        FOR v_pass IN 1 .. 2 LOOP
            SELECT v_cids || array_agg(c.id ORDER BY c.rank, c.priority DESC, c.ord),
                   v_cbatch || array_agg(c.batch_id ORDER BY c.rank, c.priority DESC, c.ord)
              INTO v_cids, v_cbatch
              FROM (
                SELECT p.id, p.batch_id, p.priority, p.rank + x.skip AS rank, k.ord
                  FROM unnest(v_keys, v_free, v_got, v_budget_left, v_fresh)
                       WITH ORDINALITY AS k (k, free, got, budget_left, fresh, ord)
                 CROSS JOIN LATERAL (
                    SELECT CASE WHEN v_pass = 1 THEN 0 ELSE k.got END AS skip,
                           CASE WHEN v_pass = 1 THEN least(k.free, v_share)
                                WHEN k.got < least(k.free, v_share) THEN 0  -- none left
                                ELSE least(k.free - k.got, v_limit - v_n_cand) END AS take) x
                 CROSS JOIN LATERAL (
                    SELECT i.id, i.batch_id, bt.priority,
                           row_number() OVER turn AS rank,
                           -- the key's cost so far in turn order (only with a budget)
                           CASE WHEN p_budget IS NOT NULL THEN sum(
                               CASE WHEN p_cost_path IS NOT NULL
                                     AND jsonb_typeof(i.payload #> p_cost_path) = 'number'
                                    THEN greatest(0, (i.payload #> p_cost_path)::double precision)
                                    ELSE 1 END) OVER turn END AS spent
                      FROM @schema.items i JOIN @schema.batches bt ON bt.id = i.batch_id
                     WHERE i.handler = p_handler AND i.limit_key = k.k AND i.status = 'queued'
                       AND i.run_after <= now()
                       AND bt.status IN ('queued', 'running')
                       AND (bt.max_concurrency IS NULL OR bt.running < bt.max_concurrency)
                    WINDOW turn AS (ORDER BY i.run_after, i.id ROWS UNBOUNDED PRECEDING)
                     ORDER BY i.run_after, i.id
                     OFFSET x.skip LIMIT x.take) p
                 WHERE x.take > 0
                   -- within the budget left, or the first item of a fresh period
                   AND (p_budget IS NULL OR p.spent <= k.budget_left
                        OR (p.rank = 1 AND k.fresh))
              ) c;
            v_n_cand := coalesce(cardinality(v_cids), 0);
            -- Pass 2 only when the shares left the claim short: the keys that had
            -- more than their share fill it, in turn order.
            EXIT WHEN v_pass = 2 OR v_n_cand >= v_limit;
            SELECT array_agg(coalesce(g.n, 0) ORDER BY k.ord) INTO v_got
              FROM unnest(v_keys) WITH ORDINALITY AS k (k, ord)
              LEFT JOIN (SELECT i.limit_key, count(*)::integer AS n
                           FROM @schema.items i WHERE i.id = ANY (v_cids)
                          GROUP BY i.limit_key) g ON g.limit_key = k.k;
        END LOOP;
    END IF;

    IF v_cids IS NOT NULL THEN
        -- Lock the candidates' batches in id order (the global lock order), then
        -- claim in turn order what their current state allows: not paused or
        -- stopped meanwhile, within max_concurrency, at most the limit in all.
        SELECT array_agg(l.id) INTO v_locked FROM (
            SELECT bt.id FROM @schema.batches bt
             WHERE bt.id IN (SELECT DISTINCT u.b FROM unnest(v_cbatch) AS u (b))
             ORDER BY bt.id FOR UPDATE) l;

        WITH c AS (
            SELECT * FROM unnest(v_cids, v_cbatch) WITH ORDINALITY AS c (id, b, ord)
        ), allowed AS (
            SELECT x.id, x.ord FROM (
                SELECT c.id, c.ord, bt.max_concurrency - bt.running AS room,
                       row_number() OVER (PARTITION BY c.b ORDER BY c.ord) AS n
                  FROM c JOIN @schema.batches bt ON bt.id = c.b
                 WHERE bt.id = ANY (v_locked) AND bt.status IN ('queued', 'running')
            ) x
             WHERE x.room IS NULL OR x.n <= x.room
             ORDER BY x.ord
             LIMIT v_limit
        ), picked AS (
            SELECT i.id, a.ord FROM @schema.items i JOIN allowed a ON a.id = i.id
             WHERE i.status = 'queued' AND i.run_after <= now()
               FOR UPDATE OF i SKIP LOCKED
        ), upd AS (
            UPDATE @schema.items i
               SET status = 'running', attempts = i.attempts + 1, worker = p_worker,
                   lease = p_lease, started_at = now()
              FROM picked WHERE i.id = picked.id
            RETURNING i.id, i.batch_id, i.limit_key, picked.ord,
                      CASE WHEN p_budget IS NULL THEN NULL
                           WHEN p_cost_path IS NOT NULL
                            AND jsonb_typeof(i.payload #> p_cost_path) = 'number'
                           THEN greatest(0, (i.payload #> p_cost_path)::double precision)
                           ELSE 1 END AS cost
        )
        SELECT array_agg(upd.id ORDER BY upd.ord), array_agg(upd.batch_id ORDER BY upd.ord),
               array_agg(upd.limit_key ORDER BY upd.ord), array_agg(upd.ord ORDER BY upd.ord),
               array_agg(upd.cost ORDER BY upd.ord)
          INTO v_ids, v_items_batch, v_items_key, v_ord, v_items_cost
          FROM upd;
    END IF;
    v_total := coalesce(cardinality(v_ids), 0);

    -- The next claim starts after the last key served when this one was full,
    -- else after the last key looked at (the keys between had no room).
    IF v_total >= v_limit THEN
        v_last := v_items_key[v_total];
    END IF;
    IF v_last IS DISTINCT FROM v_cursor THEN
        INSERT INTO @schema.key_cursors AS kc (handler, last_key) VALUES (p_handler, v_last)
            ON CONFLICT (handler) DO UPDATE SET last_key = excluded.last_key;
    END IF;
    IF v_total = 0 THEN
        RETURN;
    END IF;

    PERFORM @schema._settle_batches(
        array_agg(g.b ORDER BY g.b), array_agg(-g.n ORDER BY g.b), array_agg(g.n ORDER BY g.b),
        array_fill(0, ARRAY[count(*)::integer]), array_fill(0, ARRAY[count(*)::integer]),
        array_fill(0, ARRAY[count(*)::integer]), p_worker, false)
       FROM (SELECT x.b, count(*)::integer AS n FROM unnest(v_items_batch) AS x (b)
              GROUP BY x.b) g;

    IF p_key_rate IS NOT NULL THEN
        INSERT INTO @schema.key_rate_buckets AS r (handler, limit_key, tokens, updated_at)
        SELECT p_handler, t.k, t.tokens - g.n, v_now
          FROM (SELECT x.k, count(*)::integer AS n FROM unnest(v_items_key) AS x (k)
                 GROUP BY x.k) g
          JOIN unnest(v_keys, v_key_tokens) AS t (k, tokens) ON t.k = g.k
            ON CONFLICT (handler, limit_key)
            DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at;
        -- Buckets full again say nothing a missing row does not: keep the table
        -- to the keys started within the last refill time.
        DELETE FROM @schema.key_rate_buckets b
         WHERE b.handler = p_handler
           AND b.updated_at < v_now - make_interval(secs => p_key_burst / p_key_rate);
    END IF;
    IF p_rate IS NOT NULL THEN
        UPDATE @schema.rate_buckets r SET tokens = v_tokens - v_total, updated_at = v_now
         WHERE r.handler = p_handler;
    END IF;
    IF p_budget IS NOT NULL THEN
        -- Charge each key's period (a row of an earlier period starts over), in key
        -- order, the order correct_key_budgets locks rows in too.
        INSERT INTO @schema.key_budgets AS kb (handler, limit_key, period_start, used)
        SELECT p_handler, x.k, v_period, sum(x.c)
          FROM unnest(v_items_key, v_items_cost) AS x (k, c)
         GROUP BY x.k
         ORDER BY x.k
            ON CONFLICT (handler, limit_key) DO UPDATE
            SET used = CASE WHEN kb.period_start = excluded.period_start
                            THEN kb.used + excluded.used ELSE excluded.used END,
                period_start = excluded.period_start;
        -- Rows of past periods say nothing a missing row does not; skip those a
        -- correction holds (it matches nothing current anyway).
        DELETE FROM @schema.key_budgets kb
         USING (SELECT o.limit_key FROM @schema.key_budgets o
                 WHERE o.handler = p_handler AND o.period_start < v_period
                   FOR UPDATE SKIP LOCKED) old
         WHERE kb.handler = p_handler AND kb.limit_key = old.limit_key;
    END IF;

    RETURN QUERY SELECT i.id, i.batch_id, i.key, i.payload, i.attempts, i.max_attempts,
                        bt.metadata, i.limit_key,
                        greatest(0, extract(epoch FROM i.started_at - i.run_after))::double precision,
                        x.cost, v_period
                   FROM unnest(v_ids, v_ord, v_items_cost) AS x (id, ord, cost)
                   JOIN @schema.items i ON i.id = x.id
                   JOIN @schema.batches bt ON bt.id = i.batch_id
                  ORDER BY x.ord;
END
$$;
