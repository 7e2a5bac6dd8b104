-- 0025_trace_context: the W3C trace context a batch was submitted under (the
-- traceparent and tracestate headers of its POST /v1/batches), so that every
-- daemon that runs its items, now or after a restart, can make their attempt
-- spans children of the submitter's trace. NULL: submitted without one.
-- Both columns are new, so every existing row is NULL and passes the checks:
-- NOT VALID spares the scan of batches that validating them would take.
ALTER TABLE @schema.batches
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate text,
    ADD CONSTRAINT batches_traceparent_w3c
        CHECK (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') NOT VALID,
    ADD CONSTRAINT batches_tracestate_only_with_traceparent
        CHECK (tracestate IS NULL OR (traceparent IS NOT NULL AND length(tracestate) <= 512))
        NOT VALID;
