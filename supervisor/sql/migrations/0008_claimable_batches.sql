-- 0008_claimable_batches: claims find their candidate batches through this index
-- with bounded scans from a random starting id (functions/claim_items.sql), instead
-- of sorting every active batch of the handler on each claim: a claim's cost no
-- longer grows with the number of active batches, and a claim takes items from up
-- to 256 batches (it was 16), which is what many small batches need.
CREATE INDEX batches_claimable ON @schema.batches (handler, priority DESC, id)
    WHERE status IN ('queued', 'running') AND queued > 0;
