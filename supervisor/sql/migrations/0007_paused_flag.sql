-- 0007_paused_flag: pausing is an input of the status rule, like stop_reason, not
-- a status written by the control. pause_batch sets batches.paused and _settle
-- derives 'paused' from it (_batch_status takes the flag instead of the old
-- status), so _settle is the only writer of a batch's status on the normal path.
ALTER TABLE @schema.batches ADD COLUMN paused boolean NOT NULL DEFAULT false;
UPDATE @schema.batches SET paused = true WHERE status = 'paused';
-- The old signature; the new one is applied from functions/ after the migrations.
-- Only other functions call it, and they are all replaced in this transaction (a
-- fresh install has no functions yet at this point: they come after the migrations).
DROP FUNCTION IF EXISTS @schema._batch_status(text, integer, integer, integer, integer, integer, text, boolean);
