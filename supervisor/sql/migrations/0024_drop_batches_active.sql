-- 0024_drop_batches_active: no query reads this index since claims find their
-- batches through batches_claimable (0008), whose predicate is narrower and whose
-- key is the same plus the id. It cost an index entry for every new version of
-- a queued or running batch row (its submission and every claim and outcome write
-- that changes it), which is most of the batch-row work of small batches.
DROP INDEX IF EXISTS @schema.batches_active;
