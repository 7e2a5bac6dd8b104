-- 0018_claim_round_robin: a claim serves the batches it can see least recently
-- claimed first (functions/claim_items.sql). A claim used to take its items from
-- the first batch after a random id: the batch whose id followed a wide gap was
-- picked far more often than one after a narrow gap, and a claim for a few free
-- slots (a global_concurrency, a rate limit, a daemon with one free worker) went
-- to that one batch, so of several equal batches one could wait until the others
-- had finished. claimed_at is when a claim last took items from the batch,
-- written by _settle_batches with the claim's counters.
ALTER TABLE @schema.batches ADD COLUMN claimed_at timestamptz;
