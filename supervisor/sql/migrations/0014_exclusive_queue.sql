-- 0014_exclusive_queue: a submission whose exclusive key is held may ask to be
-- queued behind the holder (on_conflict "queue") instead of refused. It is
-- created waiting, with a dependency on the key's newest unfinished batch whose
-- policy is 'terminal' whatever the batch's after_policy: a chain, each batch
-- behind the one before, run one at a time in submission order.
--
-- A waiting batch no longer holds its key in the index (it is not running and
-- cannot start by itself): the chain's waiters would otherwise collide with their
-- holder. The key is checked when a waiting batch is released instead
-- (_settle_batches): under the key's advisory lock, if another batch holds the
-- key, or an older batch of the key is released by the same change, it keeps
-- waiting behind that one. Submissions with a key take the same lock, so the
-- check and every insert of a keyed batch are serialised per key.
ALTER TABLE @schema.batch_dependencies
    ADD COLUMN policy text CONSTRAINT batch_dependency_policy_known
        CHECK (policy IN ('completed', 'terminal'));  -- NULL: the batch's after_policy
DROP INDEX @schema.batches_exclusive;
-- Terminal statuses and waiting are listed, not the live ones, so a status added
-- later holds the key unless it is listed here.
CREATE UNIQUE INDEX batches_exclusive ON @schema.batches (tenant, exclusive_key)
    WHERE exclusive_key IS NOT NULL
      AND status NOT IN ('waiting', 'completed', 'completed_with_errors', 'failed', 'cancelled');
-- The release of a waiting keyed batch may add an edge to the key's holder
-- while holding the key's lock; a foreign key would share-lock the holder's row,
-- which the holder's own settle, waiting for that key lock, holds: a deadlock.
-- The holder's settle takes the key lock before it looks for its dependents
-- instead, so it sees the edge. An edge to a batch deleted since (only ended
-- batches are deleted, and their dependents were judged) is inert.
ALTER TABLE @schema.batch_dependencies DROP CONSTRAINT batch_dependencies_depends_on_fkey;
