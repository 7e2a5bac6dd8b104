-- _exclusive_key_lock: the transaction-level advisory lock of one exclusive key.
-- Taken by every transaction that may give a key a batch that runs (a keyed
-- submission, a retry that reopens a keyed batch, the release of a waiting keyed
-- batch) after its row locks and as its last lock, so they are serialised per
-- key and the check that the key is free holds until commit.
CREATE OR REPLACE FUNCTION @schema._exclusive_key_lock(p_tenant text, p_key text)
RETURNS void LANGUAGE sql AS $$
SELECT pg_advisory_xact_lock(hashtextextended('@sname:key:' || p_tenant || chr(31) || p_key, 0))
$$;
