-- 0023_key_throttles: backpressure per key. A handler with a key_limit may say
-- that its key is throttled (RetryAfter(s, scope="key"), an http 429 with
-- Retry-After): every queued item of that (handler, limit key) waits until
-- throttled_until, on every daemon. Written in the outcome write's transaction;
-- claim_keyed_items gives a throttled key no room. Rows past their time mean
-- nothing and are deleted by the next throttle write of the handler.
CREATE TABLE @schema.key_throttles (
    handler          text NOT NULL,
    limit_key        text NOT NULL,
    throttled_until  timestamptz NOT NULL,
    PRIMARY KEY (handler, limit_key)
);
