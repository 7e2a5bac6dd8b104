-- _settle_batches: the one place a batch row changes. For each batch named, applies
-- its counter deltas, enforces the failure budget, derives the status from the
-- counters (_batch_status), bumps the version once, moves the claim cursor (claims
-- only: a NULL keeps it) and claimed_at (claims: they alone move queued to
-- running; claim_items serves the least recently claimed batch first), writes
-- the 'started' / 'finished' events and notifies.
-- A batch that becomes terminal releases or cancels the batches waiting for it
-- (after / after_policy), in this transaction: see "Dependencies" below.
-- Returns one row per batch that became terminal (those cancelled for a
-- dependency included). p_dt: items added to each batch (fan-out from a handler,
-- add_items), counted in total as well as in p_dq; NULL: none.
-- Callers hold the batch rows' locks, have already moved the items, and name each
-- batch once.
--
-- Set-based on purpose: a claim or an outcome write that touches 50 small batches
-- costs about as many statements as one that touches one batch. Settling them one
-- by one cost ~1.5 ms per batch (five statements each, each planned), which made a
-- claim of 500 items over ten-item batches take 75 ms.
CREATE OR REPLACE FUNCTION @schema._settle_batches(
    p_batches uuid[], p_dq integer[], p_dr integer[], p_ds integer[], p_df integer[],
    p_dc integer[], p_actor text, p_reopen boolean DEFAULT false,
    p_claim_after timestamptz[] DEFAULT NULL, p_claim_id bigint[] DEFAULT NULL,
    p_dt integer[] DEFAULT NULL)
RETURNS TABLE (batch_id uuid, finished text, seconds double precision)
LANGUAGE plpgsql
-- Its callers' settings must not reach it: apply_outcomes turns nested loops off,
-- and every join here is a few batches probed by primary key, which without
-- nested loops becomes a scan of every batch row.
SET enable_nestloop = on
SET plan_cache_mode = auto AS $$
#variable_conflict use_column
DECLARE
    v_over uuid[];
    v_xid uuid[];
    v_xn integer[];
    v_ids uuid[];
    v_versions bigint[];
    v_status text[];
    v_starting boolean[];
    v_finishing boolean[];
    v_over_now boolean[];
    v_details jsonb[];
    v_budget jsonb[];
    v_stop_running boolean[];
    v_seconds double precision[];
    v_callback boolean;
    v_done uuid[];
    v_locked uuid[];
    v_dep_ids uuid[];
    v_dep_cancel boolean[];
    v_dep_n integer[];
    v_dep_detail jsonb[];
    v_keyed boolean;
BEGIN
    -- Callers hold the row locks already; FOR UPDATE makes a caller that does not
    -- wait here, before reading, instead of overwriting a concurrent change. The
    -- same read finds the batches whose failure budget this change exceeds.
    SELECT array_agg(l.id) FILTER (WHERE l.over) INTO v_over FROM (
        SELECT bt.id, (p_reopen OR (bt.stop_reason IS NULL AND bt.status NOT IN
                          ('completed', 'completed_with_errors', 'failed', 'cancelled')))
                      AND bt.max_failures_limit IS NOT NULL
                      AND bt.failed + d.df > bt.max_failures_limit AS over
          FROM @schema.batches bt JOIN unnest(p_batches, p_df) AS d (id, df) ON bt.id = d.id
         ORDER BY bt.id FOR UPDATE OF bt) l;

    -- Failure budget: past it, the batch stops early (its queued items are
    -- cancelled) and ends failed. Rare, so its statements run only when needed.
    IF v_over IS NOT NULL THEN
        WITH x AS (
            UPDATE @schema.items it SET status = 'cancelled', finished_at = now(),
                   finished_version = bt.version + 1
              FROM @schema.batches bt
             WHERE bt.id = ANY (v_over) AND it.batch_id = bt.id AND it.status = 'queued'
            RETURNING it.batch_id
        )
        SELECT array_agg(o.id), array_agg(coalesce(n.n, 0))
          INTO v_xid, v_xn
          FROM unnest(v_over) AS o (id)
          LEFT JOIN (SELECT x.batch_id, count(*)::integer AS n FROM x GROUP BY x.batch_id) n
            ON n.batch_id = o.id;
    END IF;

    WITH d AS (
        SELECT x.id, x.dq - coalesce(c.n, 0) AS dq, x.dr, x.ds, x.df,
               x.dc + coalesce(c.n, 0) AS dc, c.id IS NOT NULL AS over,
               coalesce(c.n, 0) AS budget_cancelled, x.claim_after, x.claim_id,
               coalesce(x.dt, 0) AS dt
          FROM unnest(p_batches, p_dq, p_dr, p_ds, p_df, p_dc, p_claim_after, p_claim_id, p_dt)
               AS x (id, dq, dr, ds, df, dc, claim_after, claim_id, dt)
          LEFT JOIN unnest(v_xid, v_xn) AS c (id, n) ON c.id = x.id
         WHERE x.id IS NOT NULL
    ), n AS (
        -- The batch after the change, before its status is derived. Reopening
        -- (retry) clears the stop, the finish and the callback; a batch paused,
        -- then cancelled, runs when retried, while a live batch keeps its pause.
        SELECT bt.id, bt.version + 1 AS version, bt.total + d.dt AS t,
               bt.queued + d.dq AS q, bt.running + d.dr AS r, bt.succeeded + d.ds AS s,
               bt.failed + d.df AS f, bt.cancelled + d.dc AS c,
               d.over, d.budget_cancelled, d.claim_after, d.claim_id,
               d.dq < 0 AND d.dr > 0 AS claimed,  -- only a claim moves queued to running
               bt.status AS old_status,
               bt.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
                   AS terminal,
               CASE WHEN d.over THEN 'max_failures' WHEN p_reopen THEN NULL
                    ELSE bt.stop_reason END AS stop_reason,
               bt.waiting, bt.scheduled,
               bt.paused AND NOT (p_reopen AND bt.status IN
                   ('completed', 'completed_with_errors', 'failed', 'cancelled')) AS paused,
               CASE WHEN p_reopen THEN 'none' ELSE bt.callback_state END AS callback_state,
               bt.callback_handler, bt.started_at, bt.created_at, bt.max_failures
          FROM @schema.batches bt JOIN d ON bt.id = d.id
    ), m AS (
        SELECT n.*,
               -- a terminal batch never changes its status (unless reopened)
               CASE WHEN n.terminal AND NOT p_reopen THEN n.old_status
                    ELSE @schema._batch_status(n.waiting, n.scheduled, n.paused, n.q, n.r,
                                               n.s, n.f, n.c, n.stop_reason,
                                               n.started_at IS NOT NULL)
               END AS new_status,
               (p_reopen OR NOT n.terminal) AND n.q + n.r = 0 AS finishing,
               n.started_at IS NULL AND (n.r > 0 OR n.s + n.f > 0) AS starting
          FROM n
    ), upd AS (
        UPDATE @schema.batches bt SET
            status = m.new_status, total = m.t, queued = m.q, running = m.r, succeeded = m.s,
            failed = m.f, cancelled = m.c, version = m.version, stop_reason = m.stop_reason,
            paused = m.paused,
            -- an ended batch waits for nothing, nor for its time (a retry runs it
            -- at once)
            waiting = m.waiting AND NOT m.finishing,
            scheduled = m.scheduled AND NOT m.finishing,
            started_at = CASE WHEN m.starting THEN now() ELSE bt.started_at END,
            finished_at = CASE WHEN m.finishing THEN now() WHEN p_reopen THEN NULL
                               ELSE bt.finished_at END,
            callback_state = CASE WHEN m.finishing AND m.callback_handler IS NOT NULL
                                       AND m.callback_state = 'none' THEN 'pending'
                                  ELSE m.callback_state END,
            callback_attempts = CASE WHEN p_reopen THEN 0 ELSE bt.callback_attempts END,
            callback_error = CASE WHEN p_reopen THEN NULL ELSE bt.callback_error END,
            callback_run_after = CASE WHEN m.finishing AND m.callback_handler IS NOT NULL
                                           AND m.callback_state = 'none' THEN now()
                                      WHEN p_reopen THEN NULL
                                      ELSE bt.callback_run_after END,
            claim_after = coalesce(m.claim_after, bt.claim_after),
            claim_id = coalesce(m.claim_id, bt.claim_id),
            claimed_at = CASE WHEN m.claimed THEN clock_timestamp() ELSE bt.claimed_at END
          FROM m WHERE bt.id = m.id
        RETURNING bt.id, bt.version, bt.status, m.starting, m.finishing, m.over,
                  bt.running > 0 AS still_running,
                  jsonb_build_object('status', bt.status, 'succeeded', bt.succeeded,
                                     'failed', bt.failed, 'cancelled', bt.cancelled) AS detail,
                  jsonb_build_object('failed', bt.failed, 'max_failures', m.max_failures,
                                     'cancelled_queued', m.budget_cancelled) AS budget,
                  extract(epoch FROM now() - bt.created_at)::double precision AS seconds,
                  m.finishing AND m.callback_handler IS NOT NULL
                      AND m.callback_state = 'none' AS callback
    )
    SELECT array_agg(u.id ORDER BY u.id), array_agg(u.version ORDER BY u.id),
           array_agg(u.status ORDER BY u.id), array_agg(u.starting ORDER BY u.id),
           array_agg(u.finishing ORDER BY u.id), array_agg(u.over ORDER BY u.id),
           array_agg(u.still_running ORDER BY u.id), array_agg(u.detail ORDER BY u.id),
           array_agg(u.budget ORDER BY u.id), array_agg(u.seconds ORDER BY u.id),
           coalesce(bool_or(u.callback), false)
      INTO v_ids, v_versions, v_status, v_starting, v_finishing, v_over_now,
           v_stop_running, v_details, v_budget, v_seconds, v_callback
      FROM upd u;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- The audit log, in the order things happened to each batch.
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    SELECT e.id, e.action, p_actor, e.detail FROM (
        SELECT x.id, x.o, 1 AS step, 'failure_budget_exceeded' AS action, x.budget AS detail
          FROM unnest(v_ids, v_over_now, v_budget) WITH ORDINALITY AS x (id, over, budget, o)
         WHERE x.over
        UNION ALL
        SELECT x.id, x.o, 2, 'started', '{}'::jsonb
          FROM unnest(v_ids, v_starting) WITH ORDINALITY AS x (id, starting, o)
         WHERE x.starting
        UNION ALL
        SELECT x.id, x.o, 3, 'finished', x.detail
          FROM unnest(v_ids, v_finishing, v_details) WITH ORDINALITY AS x (id, fin, detail, o)
         WHERE x.fin
    ) e ORDER BY e.o, e.step;

    -- A stopped batch's running attempts are cancelled by every daemon holding one.
    PERFORM pg_notify('@sname_control', 'cancel:' || x.id::text)
       FROM unnest(v_ids, v_over_now, v_stop_running) AS x (id, over, running)
      WHERE x.over AND x.running;
    IF v_callback THEN
        PERFORM pg_notify('@sname_wake', 'callback');
    END IF;
    PERFORM pg_notify('@sname_batch', x.id::text || ':' || x.version::text || ':' || x.status)
       FROM unnest(v_ids, v_versions, v_status) AS x (id, version, status);

    -- Dependencies: the batches waiting for one that ended here are released
    -- (queued) or, when their after_policy forbids how it ended, cancelled, in
    -- this transaction, so no moment exists where a dependency is terminal and
    -- its dependent still waits for it.
    SELECT array_agg(x.id) INTO v_done
      FROM unnest(v_ids, v_finishing) AS x (id, fin) WHERE x.fin;
    IF v_done IS NOT NULL AND EXISTS (
        SELECT 1 FROM @schema.batch_dependencies bd WHERE bd.depends_on = ANY (v_done)) THEN
        -- Lock order. Our caller holds its batches (locked in id order, first);
        -- the waiting batches are locked after them, all that this change may
        -- reach (dependents, their dependents, ...) in one statement in id order,
        -- even those it will leave waiting. That is safe because a waiting batch
        -- has no running items: claims take only queued and running batches, and
        -- outcome writes and the reaper only batches with running items, so none
        -- of them holds a waiting batch while waiting for one of ours. The only
        -- other lockers of waiting batches are another settle doing the same (its
        -- set in id order too), a control on one waiting batch (cancel_batch
        -- locks it together with its waiting dependents in id order; pause and
        -- patch lock that one row and nothing after), promote_scheduled (SKIP
        -- LOCKED, nothing else locked before or after), and a submission naming it
        -- in `after` (a share lock, taken before anything else it locks). A
        -- submission that commits while this statement waits can add a dependent
        -- it did not see: the cascade below locks that one later, the one order
        -- this does not keep; PostgreSQL's deadlock detection is the backstop.
        -- Exclusive keys' advisory locks come after all row locks, in every
        -- transaction that takes them (see _exclusive_key_lock), in hash order
        -- within one statement; a cascade that releases batches of another key
        -- one level deeper takes that key later, the other order not kept.
        SELECT array_agg(l.id) INTO v_locked FROM (
            SELECT bt.id FROM @schema.batches bt
             WHERE bt.id = ANY (@schema._waiting_dependents(v_done)) AND bt.status = 'waiting'
             ORDER BY bt.id FOR UPDATE OF bt) l;
        -- A batch of an exclusive key that ends takes the key's lock before it
        -- looks for its dependents: a release that queues a batch behind it adds
        -- that edge under the lock (below), so the edge is seen here. Those
        -- dependents were not in the set above; they are locked now (id order).
        IF EXISTS (SELECT 1 FROM @schema.batches bt
                    WHERE bt.id = ANY (v_done) AND bt.exclusive_key IS NOT NULL) THEN
            PERFORM @schema._exclusive_key_lock(k.tenant, k.exclusive_key)
               FROM (SELECT DISTINCT bt.tenant, bt.exclusive_key FROM @schema.batches bt
                      WHERE bt.id = ANY (v_done) AND bt.exclusive_key IS NOT NULL) k
              ORDER BY hashtextextended('@sname:key:' || k.tenant || chr(31) || k.exclusive_key,
                                        0);
            SELECT v_locked || array_agg(l.id) INTO v_locked FROM (
                SELECT bt.id FROM @schema.batches bt
                 WHERE bt.id IN (SELECT bd.batch_id FROM @schema.batch_dependencies bd
                                  WHERE bd.depends_on = ANY (v_done))
                   AND bt.status = 'waiting' AND NOT bt.id = ANY (coalesce(v_locked, '{}'))
                 ORDER BY bt.id FOR UPDATE OF bt) l;
        END IF;
        -- A new statement, so a new snapshot: it sees what the settles we waited
        -- for above committed (their dependencies' ends). Each direct dependent is
        -- judged on all its dependencies, each edge by its policy (the batch's
        -- after_policy, or 'terminal' for the edge an exclusive key's queue adds):
        -- cancelled when one ended as its policy forbids ('completed': any end but
        -- completed), released when all ended.
        WITH e AS (
            SELECT d.id, d.handler, d.tenant, d.exclusive_key, d.created_at,
                   bool_or(dep.status IN ('completed_with_errors', 'failed', 'cancelled')
                           AND coalesce(bd.policy, d.after_policy) = 'completed')
                       AS forbidden,
                   bool_and(dep.status IN ('completed', 'completed_with_errors', 'failed',
                                           'cancelled')) AS ended,
                   (array_agg(jsonb_build_object('dependency', dep.id, 'status', dep.status,
                                                 'after_policy',
                                                 coalesce(bd.policy, d.after_policy))
                              ORDER BY dep.finished_at, dep.id)
                        FILTER (WHERE dep.status IN ('completed_with_errors', 'failed',
                                                     'cancelled')
                                  AND coalesce(bd.policy, d.after_policy) = 'completed'))[1]
                       AS culprit,
                   jsonb_agg(jsonb_build_object('dependency', dep.id, 'status', dep.status)
                             ORDER BY dep.id) AS deps
              FROM @schema.batches d
              JOIN @schema.batch_dependencies bd ON bd.batch_id = d.id
              JOIN @schema.batches dep ON dep.id = bd.depends_on
             WHERE d.id = ANY (v_locked) AND d.status = 'waiting'
               AND d.id IN (SELECT bd0.batch_id FROM @schema.batch_dependencies bd0
                             WHERE bd0.depends_on = ANY (v_done))
             GROUP BY d.id, d.handler, d.tenant, d.exclusive_key, d.created_at
        )
        SELECT array_agg(e.id ORDER BY e.id), array_agg(e.forbidden ORDER BY e.id),
               array_agg(CASE WHEN e.forbidden THEN e.culprit
                              ELSE jsonb_build_object('dependencies', e.deps) END
                         ORDER BY e.id),
               coalesce(bool_or(NOT e.forbidden AND e.exclusive_key IS NOT NULL), false)
          INTO v_dep_ids, v_dep_cancel, v_dep_detail, v_keyed
          FROM e WHERE e.forbidden OR e.ended;

        -- Exclusive keys: a waiting batch does not hold its key, so one released
        -- must find it free. Under the key's lock (after every row lock, see
        -- _exclusive_key_lock; keys in a fixed order), a released batch whose key
        -- another batch holds, or an older batch of its key released here, keeps
        -- waiting behind that one (a 'terminal' edge): one runs, the rest stay a
        -- chain in submission order.
        IF v_keyed THEN
            PERFORM @schema._exclusive_key_lock(k.tenant, k.exclusive_key)
               FROM (SELECT DISTINCT bt.tenant, bt.exclusive_key FROM @schema.batches bt
                       JOIN unnest(v_dep_ids, v_dep_cancel) AS c (id, cx) ON c.id = bt.id
                      WHERE NOT c.cx AND bt.exclusive_key IS NOT NULL) k
              ORDER BY hashtextextended('@sname:key:' || k.tenant || chr(31) || k.exclusive_key,
                                        0);
            -- A new statement: it sees the key's holders committed before the lock.
            WITH r AS (
                SELECT bt.id, bt.tenant, bt.exclusive_key,
                       lag(bt.id) OVER (PARTITION BY bt.tenant, bt.exclusive_key
                                        ORDER BY bt.created_at, bt.id) AS before
                  FROM @schema.batches bt
                  JOIN unnest(v_dep_ids, v_dep_cancel) AS c (id, cx) ON c.id = bt.id
                 WHERE NOT c.cx AND bt.exclusive_key IS NOT NULL
            ), behind AS (
                SELECT r.id, coalesce(r.before, (
                           SELECT h.id FROM @schema.batches h
                            WHERE h.tenant = r.tenant AND h.exclusive_key = r.exclusive_key
                              AND h.exclusive_key IS NOT NULL
                              AND h.status NOT IN ('waiting', 'completed',
                                                   'completed_with_errors', 'failed',
                                                   'cancelled'))) AS holder
                  FROM r
            ), edge AS (
                INSERT INTO @schema.batch_dependencies (batch_id, depends_on, policy)
                SELECT b.id, b.holder, 'terminal' FROM behind b WHERE b.holder IS NOT NULL
                ON CONFLICT (batch_id, depends_on) DO UPDATE SET policy = 'terminal'
                RETURNING batch_id, depends_on
            ), ev AS (
                INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
                SELECT edge.batch_id, 'exclusive_key_queued', p_actor,
                       jsonb_build_object('behind', edge.depends_on)
                  FROM edge ORDER BY edge.batch_id
            )
            SELECT array_agg(x.id ORDER BY x.id), array_agg(x.cx ORDER BY x.id),
                   array_agg(x.detail ORDER BY x.id)
              INTO v_dep_ids, v_dep_cancel, v_dep_detail
              FROM unnest(v_dep_ids, v_dep_cancel, v_dep_detail) AS x (id, cx, detail)
             WHERE x.id NOT IN (SELECT b.id FROM behind b WHERE b.holder IS NOT NULL);
        END IF;

        IF v_dep_ids IS NOT NULL THEN
            INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
            SELECT x.id, CASE WHEN x.cx THEN 'dependency_failed' ELSE 'dependencies_met' END,
                   p_actor, x.detail
              FROM unnest(v_dep_ids, v_dep_cancel, v_dep_detail) AS x (id, cx, detail)
             ORDER BY x.id;
            PERFORM pg_notify('@sname_wake', h.handler)
               FROM (SELECT DISTINCT bt.handler FROM @schema.batches bt
                       JOIN unnest(v_dep_ids, v_dep_cancel) AS c (id, cx) ON c.id = bt.id
                      WHERE NOT c.cx) h;
            -- The cancelled ones lose their queued items (they have nothing else).
            WITH x AS (
                UPDATE @schema.items it SET status = 'cancelled', finished_at = now(),
                       finished_version = bt.version + 1
                  FROM @schema.batches bt
                 WHERE bt.id = ANY (v_dep_ids) AND it.batch_id = bt.id
                   AND it.status = 'queued'
                   AND bt.id IN (SELECT c.id FROM unnest(v_dep_ids, v_dep_cancel) AS c (id, cx)
                                  WHERE c.cx)
                RETURNING it.batch_id
            )
            SELECT array_agg(coalesce(n.n, 0) ORDER BY d.o) INTO v_dep_n
              FROM unnest(v_dep_ids) WITH ORDINALITY AS d (id, o)
              LEFT JOIN (SELECT x.batch_id, count(*)::integer AS n FROM x GROUP BY x.batch_id) n
                ON n.batch_id = d.id;
            -- The inputs of the status rule, as a control writes its input; the
            -- settle below derives queued (or paused) and cancelled from them.
            UPDATE @schema.batches bt
               SET waiting = false,
                   stop_reason = CASE WHEN c.cx THEN 'dependency' ELSE bt.stop_reason END
              FROM unnest(v_dep_ids, v_dep_cancel) AS c (id, cx)
             WHERE bt.id = c.id;
            -- Those cancelled end here, so their own dependents are judged in turn.
            RETURN QUERY SELECT s.batch_id, s.finished, s.seconds
              FROM @schema._settle_batches(
                       v_dep_ids, (SELECT array_agg(-n ORDER BY o) FROM unnest(v_dep_n)
                                        WITH ORDINALITY AS u (n, o)),
                       array_fill(0, ARRAY[cardinality(v_dep_ids)]),
                       array_fill(0, ARRAY[cardinality(v_dep_ids)]),
                       array_fill(0, ARRAY[cardinality(v_dep_ids)]),
                       v_dep_n, p_actor) s;
        END IF;
    END IF;

    RETURN QUERY SELECT x.id, x.status, x.seconds
                   FROM unnest(v_ids, v_status, v_finishing, v_seconds)
                        AS x (id, status, fin, seconds)
                  WHERE x.fin;
END
$$;
