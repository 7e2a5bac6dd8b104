-- 0015_item_progress: how far a running attempt has got, as its handler reports
-- it (item.progress(done, total, note) in a python handler, a progress line of
-- an exec command). One jsonb value per item, overwritten in place: a report is
-- not a row, and a daemon writes the latest report of all its attempts in one
-- statement at most twice a second, so a handler reporting in a tight loop costs
-- the database nothing more. The value names the attempt it belongs to (a retry
-- starts without progress); `progress_at` is when it was written.
ALTER TABLE @schema.items ADD COLUMN progress jsonb, ADD COLUMN progress_at timestamptz;
-- SSE streams send a batch's progress written since they last looked: only the
-- running items that reported are in this index, so it stays as small as the
-- number of attempts running.
CREATE INDEX items_progress ON @schema.items (batch_id, progress_at)
    WHERE status = 'running' AND progress_at IS NOT NULL;
