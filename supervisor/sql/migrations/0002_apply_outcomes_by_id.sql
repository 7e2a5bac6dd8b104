-- 0002_apply_outcomes_by_id: the outcome write looks its items up by (lease, id).
-- A daemon keeps one lease for its whole life, and `items_running` keeps a dead
-- entry for every item claimed since the last vacuum; apply_outcomes found its rows
-- by scanning all of its lease's entries, so a write's cost grew with the daemon's
-- history: in a 1,000,000-item batch 42 buffer reads per item instead of 16, and
-- half the throughput (bench/README.md). Indexing (lease, id) and naming the ids
-- lets each write probe exactly its items (functions/apply_outcomes.sql).

DROP INDEX @schema.items_running;
CREATE INDEX items_running ON @schema.items (lease, id) WHERE status = 'running';
