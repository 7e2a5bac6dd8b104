/**
 * A page script that follows one batch live (watch.html loads it): a progress
 * bar from `snapshot` events, a line per finished item, and the outcome at the
 * end. It talks to the daemon with fetch (not EventSource), so it can send a
 * bearer token, and it reconnects by itself when the stream drops.
 *
 * The API accepts browser requests only from its own origin or one listed in
 * `[server] allowed_origins` and answers no CORS preflight, so serve this page
 * from the daemon's origin (e.g. behind the same reverse proxy as /v1/).
 */

import { ApiError, Client, type Batch } from "batch-supervisor-client";

const params = new URLSearchParams(location.search);
const batchId = params.get("batch") ?? "";
const token = params.get("token") ?? sessionStorage.getItem("bsv-token");
// The submission's `version`: item events also for items that finished before the page opened.
const since = params.get("since") ?? undefined;

const bar = document.querySelector<HTMLProgressElement>("#bar")!;
const status = document.querySelector<HTMLElement>("#status")!;
const log = document.querySelector<HTMLUListElement>("#items")!;

function show(batch: Batch): void {
  const c = batch.counts;
  bar.max = c.total;
  bar.value = c.succeeded + c.failed + c.cancelled;
  status.textContent = `${batch.status}: ${c.succeeded} succeeded, ${c.failed} failed, ${c.queued} queued, ${c.running} running`;
}

async function main(): Promise<void> {
  if (!batchId) {
    status.textContent = "add ?batch=<id> to the address";
    return;
  }
  // baseUrl defaults to this page's origin.
  const client = new Client({ token });
  const stop = new AbortController();
  addEventListener("pagehide", () => stop.abort());
  try {
    const final = await client.watchBatch(batchId, {
      signal: stop.signal,
      lastEventId: since,
      onSnapshot: show,
      onItem: (item) => {
        const li = document.createElement("li");
        // Keys and errors are client data: textContent, never innerHTML.
        li.textContent = `${item.key ?? item.id}: ${item.status}${item.error ? ` (${item.error.message})` : ""}`;
        log.prepend(li);
      },
      onProgress: (p) => {
        status.title = `item ${p.key ?? p.id}: ${p.done}/${p.total ?? "?"} ${p.note ?? ""}`;
      },
    });
    show(final);
    status.textContent += " (finished)";
    document.body.dataset.finished = final.status;
  } catch (err) {
    if (stop.signal.aborted) return;
    status.textContent = err instanceof ApiError ? `${err.status} ${err.detail}` : String(err);
  }
}

void main();
