-- patch_batch: the previous signature of patch_batch_v2 (no not_before), kept for
-- daemons of the previous release during a rolling upgrade. PL/pgSQL, whose body
-- is resolved when called: the functions are created in name order.
CREATE OR REPLACE FUNCTION @schema.patch_batch(p_batch uuid, p_tenant text, p_actor text,
                                    p_fields jsonb, p_priority integer, p_max_concurrency integer,
                                    p_max_failures jsonb, p_max_failures_limit integer)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RETURN @schema.patch_batch_v2(
        p_batch => p_batch, p_tenant => p_tenant, p_actor => p_actor,
        p_fields => p_fields - 'not_before', p_priority => p_priority,
        p_max_concurrency => p_max_concurrency, p_max_failures => p_max_failures,
        p_max_failures_limit => p_max_failures_limit, p_not_before => NULL);
END
$$;
