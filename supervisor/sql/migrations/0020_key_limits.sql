-- 0020_key_limits: a handler's limits per key (key_limit: at most N running and
-- a rate of starts per domain, per API key), enforced by claim_keyed_items.
-- The key is computed once at submission from the payload (a JSON Pointer) and
-- stored here; NULL for the items of handlers without a key limit, which are in
-- neither index, so their submissions and claims do not pay for it.
ALTER TABLE @schema.items ADD COLUMN limit_key text;
-- The claim walks the keys with queued items (one probe per key, from where the
-- last claim stopped) and takes each key's oldest runnable items.
CREATE INDEX items_key_runnable ON @schema.items (handler, limit_key, run_after, id)
    WHERE status = 'queued' AND limit_key IS NOT NULL;
-- A key's running items, counted by the claim: a reclaimed, released or finished
-- item leaves this index with its status, which frees its key's slot.
CREATE INDEX items_key_running ON @schema.items (handler, limit_key)
    WHERE status = 'running' AND limit_key IS NOT NULL;
-- One token bucket per (handler, key), updated in the claim transaction. A key
-- without a row has a full bucket; rows full again may be deleted at any time.
CREATE TABLE @schema.key_rate_buckets (
    handler     text NOT NULL,
    limit_key   text NOT NULL,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (handler, limit_key)
);
CREATE INDEX key_rate_buckets_updated ON @schema.key_rate_buckets (handler, updated_at);
-- Where each handler's last keyed claim stopped in the order of keys: the next
-- claim starts after it, so keys take turns (round-robin) across claims and daemons.
CREATE TABLE @schema.key_cursors (
    handler   text PRIMARY KEY,
    last_key  text NOT NULL
);
