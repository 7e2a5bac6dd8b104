-- add_items: items running attempts add to their own batches (fan-out), called in
-- the transaction of those attempts' outcomes, just before apply_outcomes, so a
-- crash loses or duplicates none of them: they exist exactly when the outcome
-- that added them was written. Arguments are parallel arrays, one entry per added
-- item: the adding item (p_parents) and its attempt, the new item's key, payload
-- and limit key (its handler's key_limit; NULL without one). p_batches names every batch of the outcome write (locked here first,
-- in id order, as apply_outcomes will lock them: one lock order).
--
-- An entry is skipped (not an error) when its parent's attempt no longer holds
-- the item (fenced, like its outcome), when its batch is stopping or ended, or
-- when its key is already in the batch or earlier in this call: a crawler adding
-- every link it sees gets each URL once. Per batch, parents in id order add their
-- new items while total stays within max_items (p_default_max when NULL); a
-- parent whose items would pass it adds none (its share still counts against the
-- room of the parents after it: simple and on the safe side) and is returned
-- refused, for the caller to record that attempt as failed. Returns one row per
-- live parent in an open batch.
CREATE OR REPLACE FUNCTION @schema.add_items(
    p_lease uuid, p_batches uuid[], p_parents bigint[], p_attempts integer[], p_keys text[],
    p_payloads jsonb[], p_limit_keys text[], p_default_max integer, p_actor text)
RETURNS TABLE (parent bigint, added integer, skipped integer, refused boolean,
               total integer, max_items integer)
LANGUAGE plpgsql
-- Array parameters make generic plans terrible; plan each call for its inputs.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_parent bigint[];
    v_added integer[];
    v_skipped integer[];
    v_ok boolean[];
    v_total integer[];
    v_cap integer[];
    v_bid uuid[];
    v_n integer[];
BEGIN
    PERFORM 1 FROM @schema.batches bt WHERE bt.id = ANY (p_batches) ORDER BY bt.id FOR UPDATE;

    WITH e AS (
        -- The entries of live parents in open batches; fresh: it adds an item (no
        -- key, or a key new to the batch and first in this call).
        SELECT x.parent, x.batch_id, x.ord, x.key, x.payload, x.limit_key,
               (x.key IS NULL OR (x.first AND NOT EXISTS (
                   SELECT 1 FROM @schema.items i2
                    WHERE i2.batch_id = x.batch_id AND i2.key = x.key))) AS fresh
          FROM (SELECT u.parent, it.batch_id, u.ord, u.key, u.payload, u.limit_key,
                       row_number() OVER (PARTITION BY it.batch_id, u.key ORDER BY u.ord) = 1
                           AS first
                  FROM unnest(p_parents, p_attempts, p_keys, p_payloads, p_limit_keys)
                       WITH ORDINALITY AS u (parent, attempt, key, payload, limit_key, ord)
                  JOIN @schema.items it ON it.id = u.parent AND it.status = 'running'
                                       AND it.lease = p_lease AND it.attempts = u.attempt
                  JOIN @schema.batches bt ON bt.id = it.batch_id AND bt.stop_reason IS NULL
                   AND bt.status NOT IN ('completed', 'completed_with_errors', 'failed',
                                         'cancelled')) x
    ), per_parent AS (
        SELECT p.parent, p.batch_id, p.n, p.skipped, bt.total,
               coalesce(bt.max_items, p_default_max) AS cap,
               bt.total + sum(p.n) OVER (PARTITION BY p.batch_id ORDER BY p.parent)
                   <= coalesce(bt.max_items, p_default_max) AS ok
          FROM (SELECT e.parent, e.batch_id, (count(*) FILTER (WHERE e.fresh))::integer AS n,
                       (count(*) FILTER (WHERE NOT e.fresh))::integer AS skipped
                  FROM e GROUP BY e.parent, e.batch_id) p
          JOIN @schema.batches bt ON bt.id = p.batch_id
    ), ins AS (
        INSERT INTO @schema.items (batch_id, seq, key, handler, payload, max_attempts, limit_key)
        SELECT e.batch_id,
               bt.total - 1 + row_number() OVER (PARTITION BY e.batch_id ORDER BY e.ord),
               e.key, bt.handler, e.payload, coalesce(bt.max_attempts, bt.attempt_budget),
               e.limit_key
          FROM e
          JOIN per_parent pp ON pp.parent = e.parent AND pp.ok
          JOIN @schema.batches bt ON bt.id = e.batch_id
         WHERE e.fresh
        RETURNING batch_id
    ), c AS (
        SELECT ins.batch_id, count(*)::integer AS n FROM ins GROUP BY ins.batch_id
    )
    SELECT (SELECT array_agg(pp.parent ORDER BY pp.parent) FROM per_parent pp),
           (SELECT array_agg(CASE WHEN pp.ok THEN pp.n ELSE 0 END ORDER BY pp.parent)
              FROM per_parent pp),
           (SELECT array_agg(pp.skipped ORDER BY pp.parent) FROM per_parent pp),
           (SELECT array_agg(pp.ok ORDER BY pp.parent) FROM per_parent pp),
           (SELECT array_agg(pp.total ORDER BY pp.parent) FROM per_parent pp),
           (SELECT array_agg(pp.cap ORDER BY pp.parent) FROM per_parent pp),
           (SELECT array_agg(c.batch_id ORDER BY c.batch_id) FROM c),
           (SELECT array_agg(c.n ORDER BY c.batch_id) FROM c)
      INTO v_parent, v_added, v_skipped, v_ok, v_total, v_cap, v_bid, v_n;

    IF v_bid IS NOT NULL THEN
        INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
        SELECT x.id, 'items_added', p_actor, jsonb_build_object('items', x.n)
          FROM unnest(v_bid, v_n) AS x (id, n);
        PERFORM @schema._settle_batches(
            v_bid, v_n, array_fill(0, ARRAY[cardinality(v_bid)]),
            array_fill(0, ARRAY[cardinality(v_bid)]), array_fill(0, ARRAY[cardinality(v_bid)]),
            array_fill(0, ARRAY[cardinality(v_bid)]), p_actor, p_dt => v_n);
        PERFORM pg_notify('@sname_wake', h.handler)
           FROM (SELECT DISTINCT bt.handler FROM @schema.batches bt WHERE bt.id = ANY (v_bid)) h;
    END IF;

    RETURN QUERY SELECT x.parent, x.added, x.skipped, NOT x.ok, x.total, x.cap
                   FROM unnest(v_parent, v_added, v_skipped, v_ok, v_total, v_cap)
                        AS x (parent, added, skipped, ok, total, cap);
END
$$;
