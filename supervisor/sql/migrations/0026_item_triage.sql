-- 0026_item_triage: finding and retrying a batch's failures. Two partial
-- indexes keep the triage searches off a scan of the whole batch, and the
-- function retry_items retries a chosen set of items through retry_item.
--
-- items_error_type: the items that have an error history, by the type of their
-- last error, in id order: the error_type filter of the item listing is a
-- keyset walk, and the failures of a batch grouped by type read only its items
-- that failed at least once. Items that never failed have no entry, so the
-- happy path writes nothing more.
CREATE INDEX items_error_type ON @schema.items (batch_id, ((errors -> -1) ->> 'type'), id)
    WHERE errors <> '[]';
-- items_key_prefix: the keys of a batch in byte order (collation "C"), so that
-- a key prefix is one contiguous range whatever the database's collation is.
CREATE INDEX items_key_prefix ON @schema.items (batch_id, key COLLATE "C")
    WHERE key IS NOT NULL;
