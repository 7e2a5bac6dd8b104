-- 0016_add_items: a running attempt may add items to its own batch (fan-out: a
-- crawler adding the links it found), written by add_items in the transaction of
-- that attempt's outcome. A batch's max_items caps how far it may grow that way
-- (NULL: the daemon's [server] max_items_per_batch); an attempt whose additions
-- would pass it fails with MaxItemsExceeded and adds nothing.
ALTER TABLE @schema.batches ADD COLUMN max_items integer
    CONSTRAINT batch_max_items_positive CHECK (max_items >= 1);
-- _settle_batches takes the items added to each batch (p_dt): the old signature
-- goes, or a call naming its first seven arguments would match both (absent on
-- a fresh install, where the functions are created after the migrations).
DROP FUNCTION IF EXISTS @schema._settle_batches(uuid[], integer[], integer[], integer[], integer[],
                                                integer[], text, boolean, timestamptz[], bigint[]);
