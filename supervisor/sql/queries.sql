-- Every runtime query of batch-supervisor, by name. Parsed once by
-- supervisor/sqlfile.py; each has one typed method in supervisor/store.py, the only
-- caller. The state transitions themselves are PL/pgSQL functions in functions/ (one
-- lock order, one statement per round trip); these queries call them with named
-- arguments, so a reordered or renamed parameter fails loudly instead of binding
-- a value to the wrong one.

-- name: schema_exists
-- Whether the configured schema has a migrations table yet.
SELECT to_regclass('@schema.schema_migrations') IS NOT NULL AS present;

-- name: create_schema
-- The schema and the migrations ledger, before the first migration.
CREATE SCHEMA IF NOT EXISTS @schema;
CREATE TABLE IF NOT EXISTS @schema.schema_migrations (
    version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());

-- name: lock_migrations
-- Transaction advisory lock so only one process migrates at a time (safe behind a
-- transaction pooler, unlike a session lock).
SELECT pg_advisory_xact_lock(hashtext('@sname:migrate'));

-- name: applied_versions
-- Versions already applied.
SELECT version FROM @schema.schema_migrations ORDER BY version;

-- name: record_migration
-- Ledger entry for an applied migration.
INSERT INTO @schema.schema_migrations (version, name) VALUES ($1, $2);

-- name: submit_batch
-- A new batch with all counters queued, its items ($17 keys, $18 payloads; empty
-- when they come by COPY in the same transaction), its 'created' event and the
-- wake-ups, in one statement: a small submission is one round trip, atomic on its
-- own. No row back (nothing inserted) when a unique index refuses the batch: its
-- idempotency key names a batch, or an unfinished batch holds its exclusive key
-- ($20). ON CONFLICT without a target covers both, and waits for a concurrent
-- submission holding either to commit or roll back, so races end in one batch,
-- never in an error. The NOTIFYs are delivered at commit. $21: the batches it
-- runs after (empty: none), $22 its after_policy, $23 whether they let it run yet
-- (false: it is created waiting; the caller holds share locks on them, see
-- lock_dependencies). $24: the batch of its exclusive key it is queued behind
-- (on_conflict "queue"; an edge of policy 'terminal'), or NULL. $25: not_before
-- (NULL: none); later than now (the database clock) the batch is created
-- scheduled, its items' run_after is that time, and the delayed starters are told
-- instead of the claimers.
-- $26: its max_items (NULL: the daemons' [server] max_items_per_batch).
-- $27: the items' limit keys, in the order of $17 (empty: the handler has no key
-- limit). $28, $29: the W3C traceparent and tracestate it was submitted under
-- (NULL: none).
WITH b AS (
    INSERT INTO @schema.batches (
        id, tenant, handler, status, priority, max_concurrency, max_attempts, attempt_budget,
        max_failures, max_failures_limit, metadata, idempotency_key, request_hash, total,
        queued, created_by, callback_handler, exclusive_key, after_ids, after_policy, waiting,
        not_before, scheduled, max_items, traceparent, tracestate)
    VALUES ($1, $2, $3, CASE WHEN NOT $23::boolean THEN 'waiting'
                             WHEN $25::timestamptz > now() THEN 'scheduled'
                             ELSE 'queued' END, $4, $5, $6,
            $7, $8, $9, $10, $11, $12, $13, $13, $14, $15, $20,
            CASE WHEN cardinality($21::uuid[]) > 0 THEN $21::uuid[] END, $22, NOT $23::boolean,
            $25::timestamptz, coalesce($25::timestamptz > now(), false), $26, $28, $29)
    ON CONFLICT DO NOTHING
    RETURNING *
), deps AS (
    INSERT INTO @schema.batch_dependencies (batch_id, depends_on, policy)
    SELECT b.id, u.id, NULL FROM b, unnest($21::uuid[]) AS u (id)
    UNION ALL
    SELECT b.id, $24::uuid, 'terminal' FROM b WHERE $24::uuid IS NOT NULL
), new_items AS (
    INSERT INTO @schema.items (batch_id, seq, key, handler, payload, max_attempts, run_after,
                               limit_key)
    SELECT b.id, u.seq - 1, u.key, b.handler, u.payload, $16,
           greatest(coalesce(b.not_before, now()), now()), u.limit_key
      FROM b, unnest($17::text[], $18::jsonb[], $27::text[]) WITH ORDINALITY
              AS u (key, payload, limit_key, seq)
), created AS (
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    SELECT b.id, 'created', $14, $19 FROM b
)
SELECT b.* FROM b
 CROSS JOIN LATERAL (SELECT pg_notify(CASE WHEN b.scheduled THEN '@sname_schedule'
                                           ELSE '@sname_wake' END,
                                      CASE WHEN b.scheduled THEN '' ELSE b.handler END),
                            pg_notify('@sname_batch', b.id || ':' || b.version || ':' || b.status)
                     ) AS notified;

-- name: lock_dependencies
-- The batches a submission names in `after`, of its tenant, share-locked until
-- it commits: a dependency cannot end (its settle locks it FOR UPDATE) between
-- this read and the new batch's edges becoming visible, so either the status read
-- here is its end or its settle sees the new batch waiting. Locked in the lock
-- order: batches that do not wait first, then waiting ones (which settles lock
-- after theirs), each in id order.
SELECT id, status FROM @schema.batches
 WHERE id = ANY ($1::uuid[]) AND tenant = $2
 ORDER BY status = 'waiting', id
   FOR SHARE;

-- name: waiting_on
-- The dependencies of a waiting batch that have not ended yet, in id order.
SELECT dep.id FROM @schema.batch_dependencies bd
  JOIN @schema.batches dep ON dep.id = bd.depends_on
 WHERE bd.batch_id = $1
   AND dep.status NOT IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
 ORDER BY dep.id;

-- name: find_idempotent_batch
-- The batch an idempotency key already names, with the hash of its request.
SELECT id, request_hash FROM @schema.batches WHERE tenant = $1 AND idempotency_key = $2;

-- name: find_exclusive_holder
-- The unfinished batch holding an exclusive key, if any: the one that may run
-- (index batches_exclusive), else the oldest waiting one.
SELECT id, status FROM @schema.batches
 WHERE tenant = $1 AND exclusive_key = $2
   AND status NOT IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
 ORDER BY status = 'waiting', created_at, id
 LIMIT 1;

-- name: exclusive_tail
-- The newest unfinished batch of an exclusive key, waiting ones included: the
-- one a submission queued on the key waits behind (index batches_exclusive_listing).
SELECT id, status FROM @schema.batches
 WHERE tenant = $1 AND exclusive_key = $2
   AND status NOT IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
 ORDER BY created_at DESC, id DESC
 LIMIT 1;

-- name: lock_exclusive_key
-- The key's advisory lock until the transaction ends (see _exclusive_key_lock).
SELECT @schema._exclusive_key_lock($1, $2);

-- name: notify_wake
-- Wake idle daemons: new runnable work for a handler.
SELECT pg_notify('@sname_wake', $1::text);

-- name: batch_trace_contexts
-- The trace context each of these batches was submitted under, for the ones that
-- have one (asked only by a daemon that traces, once per batch it claims from).
SELECT id, traceparent, tracestate FROM @schema.batches
 WHERE id = ANY ($1::uuid[]) AND traceparent IS NOT NULL;

-- name: get_batch
-- One batch, visible to the tenant (NULL tenant: any).
SELECT * FROM @schema.batches WHERE id = $1 AND ($2::text IS NULL OR tenant = $2);

-- name: list_batches
-- Newest first, keyset-paged on (created_at, id); filters are optional.
SELECT * FROM @schema.batches
 WHERE ($1::text IS NULL OR tenant = $1)
   AND ($2::text IS NULL OR status = $2)
   AND ($3::text IS NULL OR handler = $3)
   AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
   AND ($7::text IS NULL OR exclusive_key = $7)
 ORDER BY created_at DESC, id DESC
 LIMIT $6;

-- name: list_items
-- A batch's items in id order, keyset-paged on id; status filter optional.
SELECT id, batch_id, key, status, payload, result, attempts, max_attempts,
       errors -> -1 AS error, run_after, worker, created_at, started_at, finished_at, progress,
       limit_key
  FROM @schema.items
 WHERE batch_id = $1 AND ($2::text IS NULL OR status = $2) AND id > $3
 ORDER BY id
 LIMIT $4;

-- name: list_items_by_key
-- A batch's items whose key lies in [$2, $3) in byte order, so a key prefix (or
-- one exact key) is one range of items_key_prefix (both bounds always given: a
-- generic plan then knows the range is narrow); status ($4) and last error
-- type ($5) filters optional; id order after $6.
SELECT id, batch_id, key, status, payload, result, attempts, max_attempts,
       errors -> -1 AS error, run_after, worker, created_at, started_at, finished_at, progress,
       limit_key
  FROM @schema.items
 WHERE batch_id = $1 AND key IS NOT NULL AND key COLLATE "C" >= $2
   AND key COLLATE "C" < $3
   AND ($4::text IS NULL OR status = $4)
   AND ($5::text IS NULL OR (errors <> '[]' AND (errors -> -1) ->> 'type' = $5))
   AND id > $6
 ORDER BY id
 LIMIT $7;

-- name: list_items_by_error_type
-- A batch's items whose last error has the type $2, in id order after $4 (a
-- keyset walk of items_error_type); status filter ($3) optional.
SELECT id, batch_id, key, status, payload, result, attempts, max_attempts,
       errors -> -1 AS error, run_after, worker, created_at, started_at, finished_at, progress,
       limit_key
  FROM @schema.items
 WHERE batch_id = $1 AND errors <> '[]' AND (errors -> -1) ->> 'type' = $2
   AND ($3::text IS NULL OR status = $3) AND id > $4
 ORDER BY id
 LIMIT $5;

-- name: batch_failures
-- A batch's failed items grouped by the type of their last error, largest group
-- first, each with the newest failed item of the group as its sample (read
-- from items_error_type: only items that ever failed).
SELECT g.error_type, g.count, g.sample_id, s.key AS sample_key,
       (s.errors -> -1) ->> 'message' AS sample_message,
       (s.errors -> -1) ->> 'at' AS sample_at
  FROM (SELECT (errors -> -1) ->> 'type' AS error_type, count(*) AS count, max(id) AS sample_id
          FROM @schema.items
         WHERE batch_id = $1 AND errors <> '[]' AND status = 'failed'
         GROUP BY 1) g
  JOIN @schema.items s ON s.id = g.sample_id
 ORDER BY g.count DESC, g.error_type NULLS LAST
 LIMIT $2;

-- name: item_results
-- One page of a batch's outcomes for an export, in id order after the item id $3
-- (keyset on items_by_batch: a page starts where the last one ended, however deep
-- into the batch); $2 NULL: every status.
SELECT id, key, status, attempts, result, errors -> -1 AS error
  FROM @schema.items
 WHERE batch_id = $1 AND id > $3 AND ($2::text[] IS NULL OR status = ANY ($2::text[]))
 ORDER BY id
 LIMIT $4;

-- name: get_item
-- One item with its whole error history, visible to the tenant.
SELECT i.id, i.batch_id, i.key, i.status, i.payload, i.result, i.attempts, i.max_attempts,
       i.errors -> -1 AS error, i.errors, i.errors_dropped, i.run_after, i.worker,
       i.created_at, i.started_at, i.finished_at, i.progress, i.limit_key
  FROM @schema.items i JOIN @schema.batches b ON b.id = i.batch_id
 WHERE i.id = $1 AND ($2::text IS NULL OR b.tenant = $2);

-- name: items_finished_since
-- Items that reached a terminal state after a batch version (for SSE item events).
SELECT id, key, status, errors -> -1 AS error, finished_version
  FROM @schema.items
 WHERE batch_id = $1 AND finished_version > $2
 ORDER BY finished_version, id
 LIMIT $3;

-- name: record_progress
-- The latest progress reports of this lease's running attempts, all in one
-- statement; a report whose attempt is over (outcome written, reclaimed,
-- released) matches nothing. Wakes each batch's SSE streams; returns how many
-- items took a report.
WITH upd AS (
    UPDATE @schema.items i SET progress = r.progress, progress_at = clock_timestamp()
      FROM unnest($2::bigint[], $3::int[], $4::jsonb[]) AS r (id, attempt, progress)
     WHERE i.id = r.id AND i.status = 'running' AND i.lease = $1 AND i.attempts = r.attempt
    RETURNING i.batch_id
), woken AS (
    SELECT pg_notify('@sname_batch', batch_id::text || ':progress')
      FROM (SELECT DISTINCT batch_id FROM upd) d
)
SELECT (SELECT count(*) FROM upd) AS items, (SELECT count(*) FROM woken) AS batches;

-- name: items_progress_since
-- A batch's running items whose current attempt's progress was written after $2
-- (for SSE progress events), oldest report first.
SELECT id, key, progress, progress_at
  FROM @schema.items
 WHERE batch_id = $1 AND status = 'running' AND progress_at IS NOT NULL AND progress_at > $2
   AND (progress ->> 'attempt')::int = attempts
 ORDER BY progress_at, id
 LIMIT $3;

-- name: batch_log
-- The audit log of a batch, oldest first.
SELECT at, action, actor, detail FROM @schema.batch_events WHERE batch_id = $1 ORDER BY id;

-- name: item_stats
-- Per-batch summary inputs: item duration percentiles and errors by type.
SELECT
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) AS p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) AS p95,
    max(extract(epoch FROM finished_at - started_at)) AS max,
    (SELECT coalesce(jsonb_object_agg(t, n), '{}') FROM (
        SELECT e ->> 'type' AS t, count(*) AS n
          FROM @schema.items j, jsonb_array_elements(j.errors) e
         WHERE j.batch_id = $1 AND j.errors <> '[]' GROUP BY 1) x) AS errors_by_type
  FROM @schema.items
 WHERE batch_id = $1 AND finished_at IS NOT NULL AND started_at IS NOT NULL;

-- name: claim_items
-- Claim up to p_limit runnable items of a handler for this lease (functions/claim_items.sql).
SELECT * FROM @schema.claim_items(
    p_handler => $1, p_limit => $2, p_worker => $3, p_lease => $4,
    p_global_cap => $5, p_rate => $6, p_burst => $7);

-- name: claim_keyed_items
-- claim_items for a handler with a key limit: at most $8 running, $9/s starts
-- and $11 cost units started per $12 seconds (cost at the path $13) per limit
-- key, fair across keys (functions/claim_keyed_items_v2.sql).
SELECT * FROM @schema.claim_keyed_items_v2(
    p_handler => $1, p_limit => $2, p_worker => $3, p_lease => $4,
    p_global_cap => $5, p_rate => $6, p_burst => $7,
    p_key_cap => $8, p_key_rate => $9, p_key_burst => $10,
    p_budget => $11, p_budget_period => $12, p_cost_path => $13::text[]);

-- name: assign_limit_keys
-- The limit keys of a handler's queued items that have none (submitted before it
-- had a key limit), from their payloads at $2 (the pointer's tokens) as at
-- submission: a string itself, an integer or a boolean its JSON text, anything
-- else (missing, null, a value refused at submission) the shared key ''. Rows
-- being claimed are skipped (SKIP LOCKED: two starting daemons never wait on
-- each other). Returns how many items got a key.
WITH todo AS (
    SELECT i.id FROM @schema.items i
     WHERE i.handler = $1 AND i.status = 'queued' AND i.limit_key IS NULL
       FOR UPDATE SKIP LOCKED
), done AS (
    UPDATE @schema.items i
       SET limit_key = CASE
               WHEN jsonb_typeof(i.payload #> $2::text[]) IN ('string', 'boolean')
                   THEN i.payload #>> $2::text[]
               WHEN jsonb_typeof(i.payload #> $2::text[]) = 'number'
                    AND (i.payload #>> $2::text[]) ~ '^-?[0-9]+$'
                   THEN i.payload #>> $2::text[]
               ELSE '' END
      FROM todo WHERE i.id = todo.id
    RETURNING 1
)
SELECT count(*)::integer FROM done;

-- name: apply_outcomes
-- Fenced outcome write for many items at once; returns applied items and finished batches.
SELECT * FROM @schema.apply_outcomes(
    p_lease => $1, p_batches => $2, p_ids => $3, p_attempts => $4, p_outcomes => $5,
    p_results => $6, p_errors => $7, p_delays => $8, p_actor => $9);

-- name: add_items
-- Items running attempts add to their own batches, in their outcome write's
-- transaction before apply_outcomes; one row per live parent (see add_items.sql).
SELECT * FROM @schema.add_items(
    p_lease => $1, p_batches => $2, p_parents => $3, p_attempts => $4, p_keys => $5,
    p_payloads => $6, p_limit_keys => $7, p_default_max => $8, p_actor => $9);

-- name: reclaim_leases
-- Reclaim the running items of leases that are gone (WorkerLost).
SELECT * FROM @schema.reclaim_leases(p_leases => $1, p_actor => $2);

-- name: running_items_of_lease
-- Items the database says this lease is running (to find claims whose reply was lost).
SELECT id, batch_id, attempts, handler FROM @schema.items WHERE status = 'running' AND lease = $1;

-- name: release_orphan_callbacks
-- Callbacks running under this lease that this process is not running (a lost reply).
UPDATE @schema.batches SET callback_state = 'pending', callback_lease = NULL,
       callback_run_after = now(), version = version + 1
 WHERE callback_state = 'running' AND callback_lease = $1 AND NOT (id = ANY ($2))
RETURNING id;

-- name: stopping_batches_of_lease
-- Batches being stopped (cancel, failure budget) or paused that have items under this lease.
SELECT DISTINCT i.batch_id, b.status FROM @schema.items i JOIN @schema.batches b ON b.id = i.batch_id
 WHERE i.status = 'running' AND i.lease = $1 AND (b.stop_reason IS NOT NULL OR b.status = 'paused');

-- name: attempts_not_running
-- Which of these attempts ($2 item ids, $3 attempts) lease $1 no longer runs
-- (the item was cancelled, or reclaimed): the backstop of a missed cancel_item NOTIFY.
SELECT x.id, x.attempt FROM unnest($2::bigint[], $3::integer[]) AS x (id, attempt)
 WHERE NOT EXISTS (SELECT 1 FROM @schema.items i
                    WHERE i.id = x.id AND i.status = 'running' AND i.lease = $1
                      AND i.attempts = x.attempt);

-- name: cancel_batch
-- Cancel: queued items at once, running ones are stopped by their daemon.
SELECT @schema.cancel_batch(p_batch => $1, p_tenant => $2, p_actor => $3) AS outcome;

-- name: pause_batch
-- Pause ($4 true) or resume ($4 false) claiming of a batch's items.
SELECT @schema.pause_batch(p_batch => $1, p_tenant => $2, p_actor => $3, p_pause => $4)
    AS outcome;

-- name: retry_batch
-- Failed (and optionally cancelled) items back to queued with a fresh attempt budget.
SELECT @schema.retry_batch(
    p_batch => $1, p_tenant => $2, p_actor => $3, p_include_cancelled => $4) AS outcome;

-- name: cancel_item
-- Cancel one queued or running item (fenced: a running one loses its lease).
SELECT o_outcome AS outcome, o_status AS status, o_batch AS batch_id
  FROM @schema.cancel_item(p_item => $1, p_tenant => $2, p_actor => $3);

-- name: retry_item
-- One failed, cancelled or succeeded item back to queued with a fresh attempt budget.
SELECT o_outcome AS outcome, o_status AS status, o_batch AS batch_id
  FROM @schema.retry_item(p_item => $1, p_tenant => $2, p_actor => $3);

-- name: retry_items
-- Chosen items of one batch back to queued, each through retry_item
-- (functions/retry_items.sql): by id ($2), by last error type ($3), or both.
SELECT o_item AS item, o_outcome AS outcome, o_status AS status
  FROM @schema.retry_items(p_batch => $1, p_items => $2, p_error_type => $3, p_limit => $4,
                           p_tenant => $5, p_actor => $6);

-- name: patch_batch
-- Change priority, max_concurrency, max_failures or not_before of a live batch.
SELECT @schema.patch_batch_v2(
    p_batch => $1, p_tenant => $2, p_actor => $3, p_fields => $4, p_priority => $5,
    p_max_concurrency => $6, p_max_failures => $7, p_max_failures_limit => $8,
    p_not_before => $9) AS outcome;

-- name: promote_scheduled
-- Batches whose not_before has come stop being scheduled (at most $2); the
-- seconds until the next one is due (NULL: none scheduled).
SELECT @schema.promote_scheduled(p_actor => $1, p_limit => $2) AS next_due;

-- name: delete_batch
-- Delete a terminal batch with its items (its log goes by cascade).
WITH b AS (
    DELETE FROM @schema.batches
     WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
       AND status IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
    RETURNING id
), i AS (
    DELETE FROM @schema.items WHERE batch_id IN (SELECT id FROM b)
)
SELECT id FROM b;

-- name: register_worker
-- This daemon's row in the worker registry.
INSERT INTO @schema.workers (id, name, host, pid, concurrency) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), state = 'running';

-- name: heartbeat
-- Refresh this daemon's heartbeat, state and load; returns nothing if the row was reaped.
UPDATE @schema.workers SET heartbeat_at = now(), state = $2, in_flight = $3
 WHERE id = $1 RETURNING id;

-- name: deregister_worker
-- Remove this daemon from the registry on clean exit.
DELETE FROM @schema.workers WHERE id = $1;

-- name: lock_worker_name
-- Serialises daemons registering under one worker name (transaction-scoped).
SELECT pg_advisory_xact_lock(hashtext('@sname:worker:' || $1));

-- name: workers_named
-- Other registrations under this worker name, with their heartbeat age by the database clock.
SELECT id, host, pid, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::double precision AS age_s
  FROM @schema.workers WHERE name = $1 AND id <> $2;

-- name: orphan_leases_of_name
-- Leases under this worker name that still hold running items but have no worker row.
SELECT DISTINCT i.lease AS id FROM @schema.items i
 WHERE i.status = 'running' AND i.worker = $1 AND i.lease <> $2
   AND NOT EXISTS (SELECT 1 FROM @schema.workers w WHERE w.id = i.lease);

-- name: delete_workers
-- Remove worker rows by lease.
DELETE FROM @schema.workers WHERE id = ANY ($1);

-- name: bound_idle_transaction
-- A daemon frozen (SIGSTOP) inside this transaction must not hold its locks forever.
SET LOCAL idle_in_transaction_session_timeout = '5s';

-- name: try_reaper_lock
-- Only one daemon reaps at a time (transaction-scoped advisory lock).
SELECT pg_try_advisory_xact_lock(hashtext('@sname:reaper')) AS locked;

-- name: dead_leases
-- Leases whose worker's heartbeat is older than $1 seconds, or whose worker row is gone.
SELECT id FROM @schema.workers WHERE heartbeat_at < now() - make_interval(secs => $1)
UNION
SELECT DISTINCT i.lease FROM @schema.items i
 WHERE i.status = 'running' AND NOT EXISTS (SELECT 1 FROM @schema.workers w WHERE w.id = i.lease)
UNION
SELECT DISTINCT b.callback_lease FROM @schema.batches b
 WHERE b.callback_state = 'running'
   AND NOT EXISTS (SELECT 1 FROM @schema.workers w WHERE w.id = b.callback_lease);

-- name: list_workers
-- Live daemons for GET /v1/workers.
SELECT name, host, pid, state, started_at, heartbeat_at, in_flight, concurrency
  FROM @schema.workers ORDER BY name, started_at;

-- name: claim_callbacks
-- Claim pending completion callbacks of terminal batches for this lease.
UPDATE @schema.batches b
   SET callback_state = 'running', callback_attempts = b.callback_attempts + 1,
       callback_lease = $2, callback_worker = $3, version = b.version + 1
  FROM (SELECT id FROM @schema.batches
         WHERE callback_state = 'pending' AND callback_run_after <= now()
         ORDER BY callback_run_after LIMIT $1 FOR UPDATE SKIP LOCKED) c
 WHERE b.id = c.id
RETURNING b.*;

-- name: redeliver_callback
-- Admin: run a finished completion callback again, with a fresh attempt budget.
-- Returns 'ok', 'not_found' or 'conflict:<reason>' like the batch controls.
WITH b AS (
    SELECT id, callback_state FROM @schema.batches
     WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) FOR UPDATE
), upd AS (
    UPDATE @schema.batches t
       SET callback_state = 'pending', callback_attempts = 0, callback_error = NULL,
           callback_run_after = now(), version = t.version + 1
      FROM b WHERE t.id = b.id AND b.callback_state IN ('failed', 'succeeded')
    RETURNING t.id, t.version, t.status
), logged AS (
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    SELECT id, 'callback_redeliver', $3, '{}' FROM upd
), notified AS (
    SELECT pg_notify('@sname_batch', id::text || ':' || version::text || ':' || status),
           pg_notify('@sname_wake', 'callback')
      FROM upd
)
SELECT CASE
    WHEN NOT EXISTS (SELECT 1 FROM b) THEN 'not_found'
    WHEN EXISTS (SELECT 1 FROM notified) THEN 'ok'
    WHEN (SELECT callback_state FROM b) = 'none' THEN 'conflict:this batch has no completion callback yet'
    ELSE 'conflict:the callback is ' || (SELECT callback_state FROM b) || '; only a finished one is redelivered'
END AS outcome;

-- name: finish_callback
-- Fenced callback outcome: $4 = succeeded | failed | pending (retry after $6 seconds).
WITH upd AS (
    UPDATE @schema.batches
       SET callback_state = $4, callback_error = $5, callback_lease = NULL,
           callback_run_after = now() + make_interval(secs => coalesce($6::double precision, 0)),
           version = version + 1
     WHERE id = $1 AND callback_state = 'running' AND callback_lease = $2 AND callback_attempts = $3
    RETURNING id, version, status
), logged AS (
    INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
    SELECT id, 'callback_' || $4, $7, coalesce($5, '{}') FROM upd WHERE $4 <> 'pending'
)
SELECT pg_notify('@sname_batch', id::text || ':' || version::text || ':' || status) FROM upd;

-- name: queue_stats
-- Sampled for metrics, per handler: queued items of active batches and the age of
-- the oldest runnable one; queued items of paused batches apart.
SELECT b.handler,
       coalesce(sum(b.queued) FILTER (WHERE b.status <> 'paused'), 0)::bigint AS queued,
       coalesce(sum(b.queued) FILTER (WHERE b.status = 'paused'), 0)::bigint AS paused,
       coalesce(extract(epoch FROM now() - min(o.run_after)), 0) AS lag
  FROM @schema.batches b
  LEFT JOIN LATERAL (
      SELECT i.run_after FROM @schema.items i
       WHERE i.batch_id = b.id AND i.status = 'queued' AND i.run_after <= now()
         AND b.status <> 'paused'
       ORDER BY i.run_after LIMIT 1) o ON true
 WHERE b.status IN ('queued', 'running', 'paused')
 GROUP BY b.handler;

-- name: running_stats
-- Sampled for metrics: the age of the oldest running attempt per handler (any daemon).
SELECT handler, extract(epoch FROM now() - min(started_at)) AS oldest
  FROM @schema.items WHERE status = 'running' GROUP BY handler;

-- name: unfinished_batch_stats
-- Sampled for metrics: the age of the oldest batch in each non-terminal status.
SELECT status, extract(epoch FROM now() - min(created_at)) AS oldest
  FROM @schema.batches
 WHERE status IN ('scheduled', 'queued', 'running', 'paused', 'cancelling') GROUP BY status;

-- name: retention_delete
-- Delete up to $2 terminal batches finished before $1 seconds ago, with their items.
WITH b AS (
    DELETE FROM @schema.batches WHERE id IN (
        SELECT id FROM @schema.batches
         WHERE finished_at < now() - make_interval(secs => $1)
           AND status IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
           AND callback_state NOT IN ('pending', 'running')
         ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING id
), i AS (
    DELETE FROM @schema.items WHERE batch_id IN (SELECT id FROM b)
)
SELECT id FROM b;

-- name: doctor_drift
-- Batches whose counters or status disagree with their items (the batch invariants).
SELECT b.id, b.status, b.total, b.queued, b.running, b.succeeded, b.failed, b.cancelled,
       coalesce(c.n, 0) AS n, coalesce(c.q, 0) AS q, coalesce(c.r, 0) AS r,
       coalesce(c.s, 0) AS s, coalesce(c.f, 0) AS f, coalesce(c.c, 0) AS c
  FROM @schema.batches b
  LEFT JOIN (
      SELECT batch_id, count(*) AS n,
             count(*) FILTER (WHERE status = 'queued') AS q,
             count(*) FILTER (WHERE status = 'running') AS r,
             count(*) FILTER (WHERE status = 'succeeded') AS s,
             count(*) FILTER (WHERE status = 'failed') AS f,
             count(*) FILTER (WHERE status = 'cancelled') AS c
        FROM @schema.items GROUP BY batch_id) c ON c.batch_id = b.id
 WHERE b.total <> coalesce(c.n, 0) OR b.queued <> coalesce(c.q, 0) OR b.running <> coalesce(c.r, 0)
    OR b.succeeded <> coalesce(c.s, 0) OR b.failed <> coalesce(c.f, 0)
    OR b.cancelled <> coalesce(c.c, 0)
    OR ((b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled'))
        <> (coalesce(c.q, 0) + coalesce(c.r, 0) = 0));

-- name: doctor_orphans
-- Items running under a lease no registered worker holds (the reaper's backlog).
SELECT count(*) AS n FROM @schema.items i
 WHERE i.status = 'running' AND NOT EXISTS (SELECT 1 FROM @schema.workers w WHERE w.id = i.lease);

-- name: doctor_stray_items
-- Items whose batch no longer exists (there is no foreign key; see 0001).
SELECT i.batch_id, count(*) AS n FROM @schema.items i
 WHERE NOT EXISTS (SELECT 1 FROM @schema.batches b WHERE b.id = i.batch_id)
 GROUP BY i.batch_id;

-- name: doctor_delete_stray_items
-- doctor --repair: remove items of a batch that no longer exists.
DELETE FROM @schema.items i
 WHERE i.batch_id = $1 AND NOT EXISTS (SELECT 1 FROM @schema.batches b WHERE b.id = $1);

-- name: doctor_repair
-- Recompute one batch's counters from its items and re-derive its status.
SELECT @schema.repair_batch(p_batch => $1, p_actor => $2) AS status;

-- name: ensure_schedules
-- A row for each configured schedule not seen before: its slots count from now.
INSERT INTO @schema.schedules (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING;

-- name: schedule_states
-- Each schedule's pause flag, since and latest slot with a run, and the database
-- clock every slot is compared against.
SELECT s.name, s.paused, s.since, s.paused_at, s.paused_by,
       (SELECT max(r.slot_at) FROM @schema.schedule_runs r
         WHERE r.schedule = s.name AND r.kind <> 'manual') AS last_slot_at,
       now() AS now
  FROM @schema.schedules s WHERE s.name = ANY($1::text[]) ORDER BY s.name;

-- name: claim_schedule_slot
-- Record a run of a schedule, with the batch or pipeline run it fired (see
-- claim_schedule_slot_v2.sql for the answers).
SELECT @schema.claim_schedule_slot_v2(
    p_schedule => $1, p_slot_at => $2, p_kind => $3, p_outcome => $4, p_batch => $5,
    p_pipeline_run => $6, p_detail => $7, p_worker => $8) AS verdict;

-- name: schedule_unfinished_batches
-- The unfinished batches of a schedule's earlier runs (overlap = cancel), locked
-- in id order like every batch writer.
SELECT b.id FROM @schema.batches b
 WHERE b.id IN (SELECT r.batch_id FROM @schema.schedule_runs r
                 WHERE r.schedule = $1 AND r.batch_id IS NOT NULL)
   AND b.status NOT IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
 ORDER BY b.id FOR UPDATE OF b;

-- name: set_schedule_paused
-- Pause ($2 true) or resume a schedule (a row is made if no daemon made it yet);
-- resuming moves `since` to now: slots passed while paused do not fire.
INSERT INTO @schema.schedules AS s (name, paused, paused_at, paused_by)
VALUES ($1, $2, CASE WHEN $2 THEN now() END, CASE WHEN $2 THEN $3 END)
ON CONFLICT (name) DO UPDATE
   SET paused = $2,
       paused_at = CASE WHEN $2 THEN now() END,
       paused_by = CASE WHEN $2 THEN $3::text END,
       since = CASE WHEN $2 THEN s.since ELSE now() END
 WHERE s.paused IS DISTINCT FROM $2;

-- name: schedule_last_runs
-- Per schedule, its latest slot run and its latest manual run, with the status
-- of their batches (NULL once a batch is deleted) or pipeline runs.
SELECT r.id, r.schedule, r.slot_at, r.kind, r.outcome, r.batch_id, r.detail, r.worker,
       r.created_at, b.status AS batch_status, r.pipeline_run_id,
       p.status AS pipeline_run_status
  FROM unnest($1::text[]) AS n(name)
 CROSS JOIN LATERAL (
       (SELECT * FROM @schema.schedule_runs x
         WHERE x.schedule = n.name AND x.kind <> 'manual' ORDER BY x.slot_at DESC LIMIT 1)
       UNION ALL
       (SELECT * FROM @schema.schedule_runs x
         WHERE x.schedule = n.name AND x.kind = 'manual' ORDER BY x.id DESC LIMIT 1)) r
  LEFT JOIN @schema.batches b ON b.id = r.batch_id
  LEFT JOIN @schema.pipeline_runs p ON p.id = r.pipeline_run_id;

-- name: retention_delete_schedule_runs
-- Forget runs created before $1 seconds ago, but never a schedule's latest slot
-- run: it is where the next slot is counted from.
DELETE FROM @schema.schedule_runs r
 WHERE r.id IN (SELECT id FROM @schema.schedule_runs
                 WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)
   AND NOT (r.kind <> 'manual' AND r.slot_at = (
        SELECT max(x.slot_at) FROM @schema.schedule_runs x
         WHERE x.schedule = r.schedule AND x.kind <> 'manual'));

-- name: insert_pipeline_run
-- A new run (status running, at its first stage). No row back when a unique index
-- refuses it: its idempotency key names a run, or a running run of the tenant
-- holds its exclusive key. ON CONFLICT without a target covers both, and waits
-- for a concurrent submission holding either to commit or roll back.
INSERT INTO @schema.pipeline_runs (id, tenant, pipeline, stages, on_stage_failure, metadata,
                                   idempotency_key, request_hash, exclusive_key, created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: insert_pipeline_stage
-- A stage's row, with its batch (NULL: skipped), in the transaction that created
-- the batch; the run moves on to it. The primary key (run_id, stage) refuses a
-- second row for the stage: the guarantee of one batch per stage. Tells SSE
-- streams of the run (the batch channel, under the run's id).
WITH s AS (
    INSERT INTO @schema.pipeline_stages (run_id, stage, batch_id) VALUES ($1, $2, $3)
    RETURNING run_id, stage
), r AS (
    UPDATE @schema.pipeline_runs SET current_stage = s.stage FROM s WHERE id = s.run_id
    RETURNING id
)
SELECT pg_notify('@sname_batch', r.id || ':0:run') FROM r;

-- name: find_idempotent_run
-- The run an idempotency key already names, with the hash of its request.
SELECT id, request_hash FROM @schema.pipeline_runs WHERE tenant = $1 AND idempotency_key = $2;

-- name: find_exclusive_run
-- The running run holding an exclusive key, if any.
SELECT id FROM @schema.pipeline_runs
 WHERE tenant = $1 AND exclusive_key = $2 AND status = 'running';

-- name: get_pipeline_run
-- One run, visible to the tenant (NULL tenant: any).
SELECT * FROM @schema.pipeline_runs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2);

-- name: lock_pipeline_run
-- One run, locked until the transaction ends: the controls take this lock
-- before the stage batch's (the lock order of the pipelines component).
SELECT * FROM @schema.pipeline_runs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
   FOR UPDATE;

-- name: list_pipeline_runs
-- Newest first, keyset-paged on (created_at, id); filters are optional.
SELECT * FROM @schema.pipeline_runs
 WHERE ($1::text IS NULL OR tenant = $1)
   AND ($2::text IS NULL OR status = $2)
   AND ($3::text IS NULL OR pipeline = $3)
   AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT $6;

-- name: pipeline_stage_rows
-- The stage rows of the runs $1 with their batches' status (NULL: skipped, or
-- the batch was deleted), in stage order.
SELECT s.run_id, s.stage, s.batch_id, b.status AS batch_status
  FROM @schema.pipeline_stages s LEFT JOIN @schema.batches b ON b.id = s.batch_id
 WHERE s.run_id = ANY ($1::uuid[])
 ORDER BY s.run_id, s.stage;

-- name: claim_pipeline_run
-- A running run of one of the pipelines $1 (those this daemon's configuration
-- has) whose current stage's batch has ended or is gone, locked for this
-- transaction; SKIP LOCKED: one daemon advances it, the others pass it by. With
-- its current stage's batch status.
SELECT r.*, s.batch_id AS stage_batch_id, b.status AS stage_batch_status
  FROM @schema.pipeline_runs r
  JOIN @schema.pipeline_stages s ON s.run_id = r.id AND s.stage = r.current_stage
  LEFT JOIN @schema.batches b ON b.id = s.batch_id
 WHERE r.status = 'running' AND r.pipeline = ANY ($1::text[])
   AND (b.id IS NULL OR b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled'))
 ORDER BY r.created_at
 LIMIT 1
   FOR UPDATE OF r SKIP LOCKED;

-- name: finish_pipeline_run
-- A running run ends with status $2 (and the error $3, JSON or NULL). Tells SSE
-- streams of the run.
WITH r AS (
    UPDATE @schema.pipeline_runs SET status = $2, error = $3::jsonb, finished_at = now()
     WHERE id = $1 AND status = 'running'
    RETURNING id
)
SELECT pg_notify('@sname_batch', r.id || ':0:run') FROM r;

-- name: set_pipeline_run_flags
-- The run's paused, cancel_requested and degraded flags (NULL: unchanged).
WITH r AS (
    UPDATE @schema.pipeline_runs
       SET paused = coalesce($2, paused), cancel_requested = coalesce($3, cancel_requested),
           degraded = coalesce($4, degraded)
     WHERE id = $1
    RETURNING id
)
SELECT pg_notify('@sname_batch', r.id || ':0:run') FROM r;

-- name: reopen_pipeline_run
-- A terminal run is running again (retry): its error and cancel request cleared.
-- The exclusive-key index refuses it when another running run holds the key.
WITH r AS (
    UPDATE @schema.pipeline_runs
       SET status = 'running', finished_at = NULL, error = NULL, cancel_requested = false
     WHERE id = $1 AND status <> 'running'
    RETURNING id
)
SELECT pg_notify('@sname_batch', r.id || ':0:run') FROM r;

-- name: doctor_pipeline_runs
-- Pipeline runs whose stages disagree with their status: a running run whose
-- current stage's batch ended more than $1 seconds ago (no daemon moved it on)
-- or is gone, and an ended run whose current stage's batch has not ended.
SELECT r.id, r.pipeline, r.status, r.current_stage, s.batch_id, b.status AS batch_status
  FROM @schema.pipeline_runs r
  JOIN @schema.pipeline_stages s ON s.run_id = r.id AND s.stage = r.current_stage
  LEFT JOIN @schema.batches b ON b.id = s.batch_id
 WHERE (r.status = 'running'
        AND (b.id IS NULL
             OR (b.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
                 AND b.finished_at < now() - make_interval(secs => $1))))
    OR (r.status <> 'running' AND s.batch_id IS NOT NULL
        AND b.status NOT IN ('completed', 'completed_with_errors', 'failed', 'cancelled'))
 ORDER BY r.created_at;

-- name: throttle_keys
-- Pause limit keys of keyed handlers ($1 handlers, $2 keys, $3 seconds from now):
-- claim_keyed_items skips each until then. A key already paused for longer keeps
-- the later time; the handlers' expired pauses are deleted on the way. Two outcome
-- writes never deadlock here: rows are upserted in (handler, key) order, and the
-- cleanup skips rows another write holds instead of waiting for them.
WITH gone AS (
    DELETE FROM @schema.key_throttles th
     USING (SELECT x.handler, x.limit_key FROM @schema.key_throttles x
             WHERE x.handler = ANY ($1::text[]) AND x.throttled_until <= now()
               AND NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS n (h, k)
                                WHERE n.h = x.handler AND n.k = x.limit_key)
               FOR UPDATE SKIP LOCKED) old
     WHERE th.handler = old.handler AND th.limit_key = old.limit_key
)
INSERT INTO @schema.key_throttles AS th (handler, limit_key, throttled_until)
SELECT u.h, u.k, max(now() + make_interval(secs => u.s))
  FROM unnest($1::text[], $2::text[], $3::double precision[]) AS u (h, k, s)
 GROUP BY u.h, u.k
 ORDER BY u.h, u.k
    ON CONFLICT (handler, limit_key)
    DO UPDATE SET throttled_until = greatest(th.throttled_until, excluded.throttled_until);

-- name: key_throttles
-- The keys paused now (throttled_until ahead), per handler, soonest end first.
SELECT th.handler, th.limit_key, th.throttled_until FROM @schema.key_throttles th
 WHERE th.throttled_until > now()
 ORDER BY th.handler, th.throttled_until, th.limit_key
 LIMIT $1;

-- name: key_usage
-- The limit keys of handler $1 in use now, over every daemon: their running
-- items (the items_key_running index), their rate bucket's tokens refilled to
-- now at $2/s up to the burst $3 (buckets full again are left out, as if they
-- had no row), the cost charged to their budget in the current period of $5
-- seconds (none: no budget) and their pause, if any. Busiest first (most
-- running, then the most budget used, then the emptiest bucket), at most $4 keys.
WITH running AS (
    SELECT r.limit_key, count(*)::integer AS n FROM @schema.items r
     WHERE r.handler = $1 AND r.status = 'running' AND r.limit_key IS NOT NULL
     GROUP BY r.limit_key
), buckets AS (
    SELECT b.limit_key, least($3::double precision,
                              b.tokens + extract(epoch FROM now() - b.updated_at) * $2) AS tokens
      FROM @schema.key_rate_buckets b
     WHERE b.handler = $1 AND $2::double precision IS NOT NULL
), paused AS (
    SELECT th.limit_key, th.throttled_until FROM @schema.key_throttles th
     WHERE th.handler = $1 AND th.throttled_until > now()
), budgets AS (
    SELECT kb.limit_key, kb.used, kb.period_start FROM @schema.key_budgets kb
     WHERE kb.handler = $1 AND kb.used > 0
       AND kb.period_start = to_timestamp(floor(extract(epoch FROM now()) / $5::double precision)
                                          * $5::double precision)
), used AS (
    SELECT r.limit_key FROM running r
    UNION SELECT b.limit_key FROM buckets b WHERE b.tokens < $3
    UNION SELECT p.limit_key FROM paused p
    UNION SELECT g.limit_key FROM budgets g
)
SELECT u.limit_key, coalesce(r.n, 0) AS running,
       CASE WHEN b.tokens < $3 THEN b.tokens END AS tokens, p.throttled_until,
       g.used AS budget_used, g.period_start AS budget_period_start
  FROM used u
  LEFT JOIN running r ON r.limit_key = u.limit_key
  LEFT JOIN buckets b ON b.limit_key = u.limit_key
  LEFT JOIN paused p ON p.limit_key = u.limit_key
  LEFT JOIN budgets g ON g.limit_key = u.limit_key
 ORDER BY coalesce(r.n, 0) DESC, g.used DESC NULLS LAST, b.tokens ASC NULLS LAST,
          p.throttled_until DESC NULLS LAST, u.limit_key
 LIMIT $4;

-- name: correct_key_budgets
-- Corrects what keys' budgets were charged for attempts whose handlers reported
-- their actual cost: each (handler $1, key $2, period $3) gets the deltas $4
-- (actual minus charged), if that period is still the key's (a period that is
-- over is not charged again), never below zero. Rows are locked in (handler,
-- key) order, the order claims charge them in, so the two never deadlock.
WITH d AS (
    SELECT u.h, u.k, u.p, sum(u.delta) AS delta
      FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::double precision[])
           AS u (h, k, p, delta)
     GROUP BY u.h, u.k, u.p
), locked AS (
    SELECT kb.handler, kb.limit_key FROM @schema.key_budgets kb
      JOIN d ON d.h = kb.handler AND d.k = kb.limit_key AND d.p = kb.period_start
     ORDER BY kb.handler, kb.limit_key
       FOR UPDATE OF kb
)
UPDATE @schema.key_budgets kb SET used = greatest(0, kb.used + d.delta)
  FROM d, locked l
 WHERE l.handler = kb.handler AND l.limit_key = kb.limit_key
   AND d.h = kb.handler AND d.k = kb.limit_key AND d.p = kb.period_start;
