-- 0012_exclusive_key: at most one unfinished batch per (tenant, exclusive_key).
-- A client that must not run two batches of one kind at once (a nightly job per
-- portfolio) names the kind; the database refuses a second unfinished batch with
-- that name, so the guarantee holds across restarts and across every daemon on
-- this database, and frees itself when the batch becomes terminal: the status
-- change that ends a batch (in the transaction of its last item) takes its row
-- out of the index. An in-memory "already running" flag did neither.
-- Batches without a key (NULL) are in neither index.
ALTER TABLE @schema.batches ADD COLUMN exclusive_key text;
-- Terminal statuses are listed, not the live ones, so a status added later holds
-- the key unless it is terminal (the list is that of batch_terminal_iff_drained).
CREATE UNIQUE INDEX batches_exclusive ON @schema.batches (tenant, exclusive_key)
    WHERE exclusive_key IS NOT NULL
      AND status NOT IN ('completed', 'completed_with_errors', 'failed', 'cancelled');
-- GET /v1/batches?exclusive_key=: a key's batches, newest first, without scanning
-- the tenant's others.
CREATE INDEX batches_exclusive_listing
    ON @schema.batches (tenant, exclusive_key, created_at DESC, id DESC)
    WHERE exclusive_key IS NOT NULL;
