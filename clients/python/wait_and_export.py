"""Wait for a batch to end and export its results as JSON Lines.

    .venv/bin/python clients/python/wait_and_export.py BATCH_ID results.jsonl

Follows the batch's event stream (reconnecting when a daemon drains), prints
its progress, then streams every item's outcome to the file; exits 0 only when
the batch completed. BATCH_SUPERVISOR_URL / BATCH_SUPERVISOR_TOKEN say where the
daemon is.
"""

from __future__ import annotations

import json
import sys

from supervisor.client import Client, ClientError, Event


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    batch_id, path = argv

    def show(ev: Event) -> None:
        b = ev.batch
        if b is not None:
            c = b.counts
            done = c.succeeded + c.failed + c.cancelled
            print(f"{b.status}: {done}/{c.total} ({c.failed} failed)", file=sys.stderr)

    try:
        with Client() as bsv:
            batch = bsv.wait(batch_id, on_event=show)
            with open(path, "w", encoding="utf-8") as out:
                n = 0
                for rec in bsv.iter_results(batch_id):
                    out.write(json.dumps(rec) + "\n")
                    n += 1
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"batch {batch.id} {batch.status}: {n} results in {path}", file=sys.stderr)
    return 0 if batch.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
