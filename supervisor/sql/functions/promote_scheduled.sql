-- promote_scheduled: the batches whose not_before has come stop being scheduled:
-- the flag is cleared and _settle_batches derives what they are now (queued, or
-- paused if paused meanwhile, or still waiting for a dependency), writes the
-- event 'not_before_reached' and NOTIFYs the batch channel; the wake channel
-- tells the daemons of each handler to claim. Every daemon's delayed starter calls it
-- when the next batch is due (and at start-up, so a time that passed while every
-- daemon was down is acted on by the first one up); the batch rows are taken
-- FOR UPDATE SKIP LOCKED in id order, nothing else is locked, and a batch
-- already promoted is no longer scheduled, so concurrent calls neither block
-- nor repeat each other. At most p_limit batches per call.
-- Returns the seconds (database clock) until the next scheduled batch is due,
-- negative when one is due but was locked by someone else, NULL when none.
CREATE OR REPLACE FUNCTION @schema.promote_scheduled(p_actor text, p_limit integer)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
    v_n integer;
BEGIN
    SELECT array_agg(l.id ORDER BY l.id) INTO v_ids FROM (
        SELECT bt.id FROM @schema.batches bt
         WHERE bt.scheduled AND bt.not_before <= now()
         ORDER BY bt.id LIMIT p_limit
           FOR UPDATE SKIP LOCKED) l;
    IF v_ids IS NOT NULL THEN
        v_n := cardinality(v_ids);
        UPDATE @schema.batches bt SET scheduled = false WHERE bt.id = ANY (v_ids);
        INSERT INTO @schema.batch_events (batch_id, action, actor, detail)
        SELECT bt.id, 'not_before_reached', p_actor,
               jsonb_build_object('not_before', bt.not_before)
          FROM @schema.batches bt WHERE bt.id = ANY (v_ids) ORDER BY bt.id;
        PERFORM @schema._settle_batches(
            v_ids, array_fill(0, ARRAY[v_n]), array_fill(0, ARRAY[v_n]),
            array_fill(0, ARRAY[v_n]), array_fill(0, ARRAY[v_n]), array_fill(0, ARRAY[v_n]),
            p_actor);
        PERFORM pg_notify('@sname_wake', h.handler)
           FROM (SELECT DISTINCT bt.handler FROM @schema.batches bt
                  WHERE bt.id = ANY (v_ids) AND bt.status = 'queued') h;
    END IF;
    RETURN (SELECT extract(epoch FROM min(bt.not_before) - clock_timestamp())::double precision
              FROM @schema.batches bt WHERE bt.scheduled);
END
$$;
