-- _settle: _settle_batches for one batch (the batch controls settle one at a
-- time). The rules live in _settle_batches only.
CREATE OR REPLACE FUNCTION @schema._settle(
    p_batch uuid, dq integer, dr integer, ds integer, df integer, dc integer,
    p_actor text, p_reopen boolean DEFAULT false,
    OUT o_finished text, OUT o_seconds double precision)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT s.finished, s.seconds INTO o_finished, o_seconds
      FROM @schema._settle_batches(ARRAY[p_batch], ARRAY[dq], ARRAY[dr], ARRAY[ds],
                                   ARRAY[df], ARRAY[dc], p_actor, p_reopen) s;
END
$$;
