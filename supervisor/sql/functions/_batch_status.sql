-- _batch_status: the one rule that says what a batch's status is, from its
-- counters. Used by _settle (every change of a batch row) and by repair_batch
-- (doctor --repair), so the two can never disagree. A batch is terminal exactly
-- when nothing is queued or running: cancelled when it was stopped by a cancel or
-- by a dependency that ended as its after_policy forbids (p_stop_reason
-- 'dependency'), failed when stopped by its failure budget, else completed,
-- cancelled (its items were cancelled one by one, none succeeded or failed),
-- failed (nothing succeeded) or completed_with_errors. Otherwise: cancelling
-- while stopping, waiting while a dependency has not ended (p_waiting),
-- scheduled while its not_before has not come (p_scheduled; a batch both waiting
-- and scheduled shows waiting, which holds no exclusive key, until released),
-- paused while paused (p_paused, set by pause_batch; a paused waiting or
-- scheduled batch shows that until released or due, then paused), queued until
-- anything happened, else running. The caller keeps a status that is already
-- terminal (a terminal batch never changes).
CREATE OR REPLACE FUNCTION @schema._batch_status(
    p_waiting boolean, p_scheduled boolean, p_paused boolean, p_queued integer,
    p_running integer, p_succeeded integer, p_failed integer, p_cancelled integer,
    p_stop_reason text, p_started boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
SELECT CASE
    WHEN p_queued + p_running = 0 THEN CASE
        WHEN p_stop_reason IN ('cancel', 'dependency') THEN 'cancelled'
        WHEN p_stop_reason = 'max_failures' THEN 'failed'
        WHEN p_failed = 0 AND p_cancelled = 0 THEN 'completed'
        WHEN p_succeeded = 0 AND p_failed = 0 THEN 'cancelled'
        WHEN p_succeeded = 0 THEN 'failed'
        ELSE 'completed_with_errors' END
    WHEN p_stop_reason IS NOT NULL THEN 'cancelling'
    WHEN p_waiting THEN 'waiting'
    WHEN p_scheduled THEN 'scheduled'
    WHEN p_paused THEN 'paused'
    WHEN p_running + p_succeeded + p_failed + p_cancelled = 0 AND NOT p_started THEN 'queued'
    ELSE 'running' END
$$;
