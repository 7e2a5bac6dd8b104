-- _waiting_dependents: the waiting batches that wait, directly or through other
-- waiting batches, for any of p_batches; id order. The batches that one of them
-- becoming terminal may release or cancel, and so the set its settle locks at
-- once (see the lock order in _settle_batches). Only waiting batches are
-- followed: a batch that runs or has ended is past its dependencies.
CREATE OR REPLACE FUNCTION @schema._waiting_dependents(p_batches uuid[])
RETURNS uuid[] LANGUAGE sql STABLE AS $$
WITH RECURSIVE c (id) AS (
    SELECT bd.batch_id FROM @schema.batch_dependencies bd
      JOIN @schema.batches bt ON bt.id = bd.batch_id AND bt.status = 'waiting'
     WHERE bd.depends_on = ANY (p_batches)
    UNION
    SELECT bd.batch_id FROM c
      JOIN @schema.batch_dependencies bd ON bd.depends_on = c.id
      JOIN @schema.batches bt ON bt.id = bd.batch_id AND bt.status = 'waiting'
)
SELECT array_agg(c.id ORDER BY c.id) FROM c
$$;
