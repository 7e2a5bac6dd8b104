-- 0028_key_usage: what the limits per key are doing, and budgets per key.
--
-- claim_keyed_items_v2 is claim_keyed_items with a budget per key (a handler's
-- key_limit.budget: cost units started per key per period, an item's cost read
-- from its payload), returning each claimed item's limit key, how long it had
-- been runnable (for batch_supervisor_limit_wait_seconds) and its charge.
-- claim_keyed_items stays for daemons of the previous release during a rolling
-- upgrade.
--
-- One row per (handler, key) with a budget: the period it counts (fixed periods
-- from the Unix epoch, the same on every daemon) and the cost started in it,
-- corrected by the costs handlers report. A key without a row, or with a row of
-- an earlier period, has its whole budget; claims delete rows of past periods.
CREATE TABLE @schema.key_budgets (
    handler       text NOT NULL,
    limit_key     text NOT NULL,
    period_start  timestamptz NOT NULL,
    used          double precision NOT NULL,
    PRIMARY KEY (handler, limit_key)
);
CREATE INDEX key_budgets_period ON @schema.key_budgets (handler, period_start);
