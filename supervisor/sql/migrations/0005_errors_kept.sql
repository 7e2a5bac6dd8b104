-- 0005_errors_kept: an item keeps its last 20 error entries and a count of the
-- older ones. Each failed attempt appended an entry (about 6 KB with its
-- traceback) and max_attempts may be 1000, so one item's row could grow to
-- megabytes, rewritten on every attempt. apply_outcomes
-- (supervisor/sql/functions/apply_outcomes.sql) now trims as it appends; rows
-- written before this version keep their history until their next error entry.
-- Adding a column with a constant default changes only the catalog.

ALTER TABLE @schema.items ADD COLUMN errors_dropped integer NOT NULL DEFAULT 0;
