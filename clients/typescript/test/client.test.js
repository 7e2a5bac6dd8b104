// The client against a real daemon: submit, watch to the end, results, items,
// controls, problems, idempotent retries, and a watch across a daemon restart.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { ApiError, Client, ConnectionError } from "../dist/index.js";
import { startDaemon, waitFor } from "./daemon.js";

let daemon;
let client;

before(async () => {
  daemon = await startDaemon();
  client = new Client({ baseUrl: daemon.url });
});

after(async () => {
  await daemon?.close();
});

describe("submit, watch, results", () => {
  test("events arrive in order: snapshots and item events, the terminal snapshot, end", async () => {
    const items = Array.from({ length: 12 }, (_, i) => ({ key: `k${i}`, payload: { n: i } }));
    const batch = await client.submit({ handler: "echo", items, metadata: { from: "ts" } });
    assert.equal(batch.handler, "echo");
    assert.equal(batch.counts.total, 12);
    assert.match(batch.idempotency_key, /^[0-9a-f-]{36}$/, "a generated idempotency key is sent");

    const seen = [];
    const final = await client.watchBatch(batch.id, {
      onSnapshot: (b) => seen.push(["snapshot", b.status, b.version]),
      onItem: (it) => seen.push(["item", it.status, it.key]),
      onProgress: () => seen.push(["progress"]),
      onEnd: (e) => seen.push(["end", e.status]),
    });
    assert.equal(final.status, "completed");
    assert.equal(final.counts.succeeded, 12);
    // The server opens with a snapshot, except that items finishing while the
    // stream opens may be announced just before it (each is in the snapshot after).
    const firstSnapshot = seen.findIndex((e) => e[0] === "snapshot");
    assert.ok(firstSnapshot >= 0);
    assert.ok(seen.slice(0, firstSnapshot).every((e) => e[0] === "item"), JSON.stringify(seen));
    assert.deepEqual(seen.at(-1), ["end", "completed"]);
    assert.deepEqual(seen.at(-2).slice(0, 2), ["snapshot", "completed"]);
    assert.equal(seen.filter((e) => e[0] === "end").length, 1);
    const versions = seen.filter((e) => e[0] === "snapshot").map((e) => e[2]);
    assert.deepEqual(versions, [...versions].sort((a, b) => a - b), "snapshot versions only grow");
    assert.ok(seen.filter((e) => e[0] === "item").every((e) => e[1] === "succeeded"));
  });

  test("from the submission's version (Last-Event-ID) every item event comes, with ids on snapshots and end", async () => {
    const batch = await client.submit({ handler: "echo", items: [1, 2, 3] });
    await client.watchBatch(batch.id);
    // The batch has ended: a stream resumed from its submission still lists each item.
    const events = [];
    for await (const e of client.events(batch.id, { lastEventId: String(batch.version) })) events.push(e);
    assert.equal(events.filter((e) => e.event === "item").length, 3);
    assert.deepEqual(events.slice(-2).map((e) => e.event), ["snapshot", "end"]);
    assert.equal(events.at(-1).data.batch_id, batch.id);
    for (const e of events.filter((e) => e.event === "snapshot")) {
      assert.equal(e.id, String(e.data.version));
    }
    assert.equal(events.at(-1).id, events.at(-2).id, "end carries the terminal version");
  });

  test("results: every record once, in id order, filtered by status, also as CSV", async () => {
    const items = [{ key: "a", payload: "x,\"y\"\nz" }, { key: "b", payload: 2 }, { key: "c", payload: 3 }];
    const ok = await client.submit({ handler: "echo", items });
    await client.watchBatch(ok.id);
    const records = [];
    for await (const rec of client.results(ok.id)) records.push(rec);
    assert.deepEqual(records.map((r) => r.key), ["a", "b", "c"]);
    assert.deepEqual(records[0].result, { echo: "x,\"y\"\nz", attempt: 1 });
    const ids = records.map((r) => BigInt(r.id));
    assert.deepEqual(ids, [...ids].sort((a, b) => (a < b ? -1 : 1)));

    const rest = [];
    for await (const rec of client.results(ok.id, { after: records[0].id })) rest.push(rec.key);
    assert.deepEqual(rest, ["b", "c"]);

    const rows = [];
    for await (const row of client.results(ok.id, { format: "csv" })) rows.push(row);
    assert.deepEqual(rows[0], ["id", "key", "status", "attempts", "result", "error"]);
    assert.equal(rows.length, 4);
    assert.equal(rows[1][1], "a");
    assert.deepEqual(JSON.parse(rows[1][4]), { echo: "x,\"y\"\nz", attempt: 1 }, "a quoted newline stays in its cell");

    const failed = await client.submit({ handler: "permanent", items: [1, 2] });
    await client.watchBatch(failed.id);
    const none = [];
    for await (const rec of client.results(failed.id, { status: "succeeded" })) none.push(rec);
    assert.deepEqual(none, []);
    const both = [];
    for await (const rec of client.results(failed.id, { status: ["failed", "succeeded"] })) both.push(rec);
    assert.equal(both.length, 2);
    assert.equal(both[0].status, "failed");
    assert.equal(both[0].error.type, "PermanentError");
  });

  test("results cut in the middle of a record resume after the last complete one", async () => {
    const items = Array.from({ length: 6 }, (_, i) => ({ key: `c${i}`, payload: "p".repeat(200) }));
    const batch = await client.submit({ handler: "echo", items });
    await client.watchBatch(batch.id);
    const requests = [];
    const cutting = new Client({
      baseUrl: daemon.url,
      fetch: async (url, init) => {
        const resp = await fetch(url, init);
        requests.push(new URL(url).searchParams.get("after"));
        if (requests.length > 1) return resp;
        // The first response breaks off inside its third record.
        const whole = new Uint8Array(await resp.arrayBuffer());
        const text = new TextDecoder().decode(whole);
        const cut = new TextEncoder().encode(text.split("\n").slice(0, 2).join("\n") + "\n" + text.split("\n")[2].slice(0, 40));
        const body = new ReadableStream({
          start(controller) {
            controller.enqueue(cut);
          },
          pull(controller) {
            controller.error(new TypeError("terminated"));
          },
        });
        return new Response(body, { status: resp.status, headers: resp.headers });
      },
    });
    const keys = [];
    let secondId;
    for await (const rec of cutting.results(batch.id)) {
      keys.push(rec.key);
      if (keys.length === 2) secondId = rec.id;
    }
    assert.deepEqual(keys, items.map((it) => it.key), "each record once, in order");
    assert.deepEqual(requests, [null, secondId], "resumed with after=<the last complete record>");
  });

  test("listItems pages with cursor and limit; getItem has the error history", async () => {
    const batch = await client.submit({ handler: "permanent", items: [1, 2, 3, 4, 5] });
    await client.watchBatch(batch.id);
    const first = await client.listItems(batch.id, { limit: 2, status: "failed" });
    assert.equal(first.items.length, 2);
    assert.ok(first.next_cursor);
    const second = await client.listItems(batch.id, { limit: 2, cursor: first.next_cursor });
    assert.notEqual(second.items[0].id, first.items[0].id);
    const all = [];
    for await (const it of client.items(batch.id, { limit: 2 })) all.push(it.id);
    assert.equal(new Set(all).size, 5);
    const item = await client.getItem(first.items[0].id);
    assert.equal(item.status, "failed");
    assert.equal(item.errors.length, 1);
    assert.equal(item.errors[0].type, "PermanentError");
  });
});

describe("controls", () => {
  test("pause, resume, cancel; retry requeues failed items", async () => {
    const slow = await client.submit({ handler: "sleeper", items: [{ sleep: 3600 }, { sleep: 3600 }] });
    const paused = await client.pause(slow.id);
    assert.equal(paused.status, "paused");
    assert.equal((await client.pause(slow.id)).status, "paused", "pause is idempotent");
    assert.notEqual((await client.resume(slow.id)).status, "paused");
    const cancelled = await client.cancel(slow.id);
    assert.ok(["cancelling", "cancelled"].includes(cancelled.status), cancelled.status);
    const final = await client.watchBatch(slow.id);
    assert.equal(final.status, "cancelled");
    await assert.rejects(client.pause(slow.id), (err) => err instanceof ApiError && err.status === 409);

    const failed = await client.submit({ handler: "permanent", items: [1] });
    await client.watchBatch(failed.id);
    const retried = await client.retry(failed.id);
    assert.equal(retried.counts.failed, 0);
    const again = await client.watchBatch(failed.id);
    assert.equal(again.status, "failed");
    assert.equal((await client.getItem((await client.listItems(failed.id)).items[0].id)).errors.length, 2);
  });
});

describe("errors", () => {
  test("a 422 is an ApiError with the problem's fields and JSON Pointer paths", async () => {
    const err = await client.submit({ handler: "no-such-handler", items: [1] }).then(
      () => assert.fail("submitted"),
      (e) => e,
    );
    assert.ok(err instanceof ApiError, String(err));
    assert.equal(err.status, 422);
    assert.equal(err.title, "Unprocessable Content");
    assert.match(err.type, /^https?:\/\//);
    assert.equal(err.errors[0].path, "/handler");
    assert.match(err.errors[0].message, /no-such-handler/);
    assert.match(err.message, /^POST http:\/\/127\.0\.0\.1:\d+\/v1\/batches: 422 /);

    const bad = await client.submit({ handler: "echo", items: [{ key: "", payload: 1 }] }).catch((e) => e);
    assert.equal(bad.status, 422);
    assert.equal(bad.errors[0].path, "/items/0/key");
  });

  test("an unknown batch is a 404 ApiError, also for the event stream", async () => {
    const id = "00000000-0000-4000-8000-000000000000";
    await assert.rejects(client.getBatch(id), (e) => e instanceof ApiError && e.status === 404);
    await assert.rejects(client.watchBatch(id), (e) => e instanceof ApiError && e.status === 404);
    await assert.rejects(
      (async () => {
        for await (const _ of client.results(id)) assert.fail("a record");
      })(),
      (e) => e instanceof ApiError && e.status === 404,
    );
  });

  test("a bad query value is a 400 naming the parameter", async () => {
    const batch = await client.submit({ handler: "echo", items: [1] });
    const err = await client.listItems(batch.id, { status: "bogus" }).catch((e) => e);
    assert.ok(err instanceof ApiError);
    assert.equal(err.status, 400);
    assert.equal(err.errors[0].path, "status");
    assert.match(err.detail, /must be one of/);
  });

  test("no daemon there: a ConnectionError after the bounded retries", async () => {
    const nobody = new Client({ baseUrl: "http://127.0.0.1:9", maxRetries: 2 });
    const started = Date.now();
    await assert.rejects(nobody.getBatch("x"), (e) => e instanceof ConnectionError && /no response/.test(e.message));
    assert.ok(Date.now() - started < 5000);
  });
});

describe("idempotent submit", () => {
  test("an answer lost on the way back is retried with the same key: one batch", async () => {
    const key = `lost-answer-${Date.now()}`;
    let posts = 0;
    const losing = new Client({
      baseUrl: daemon.url,
      fetch: async (url, init) => {
        const resp = await fetch(url, init);
        if (init?.method === "POST" && ++posts === 1) {
          await resp.arrayBuffer(); // the daemon did create the batch...
          throw new TypeError("fetch failed"); // ...but the client never hears of it
        }
        return resp;
      },
    });
    // No key given: the generated one must be reused by the retry (another key
    // would be refused with 409, the exclusive key being held by the first batch).
    const batch = await losing.submit({ handler: "echo", items: [1, 2], exclusive_key: key });
    assert.equal(posts, 2, "retried once");
    assert.match(batch.idempotency_key, /^[0-9a-f-]{36}$/);
    const listed = await client.listBatches({ exclusiveKey: key });
    assert.deepEqual(listed.batches.map((b) => b.id), [batch.id], "exactly one batch");
  });

  test("a key that is not ASCII goes in the body only, and works", async () => {
    const key = `clé-${Date.now()}-✓`;
    const a = await client.submit({ handler: "echo", items: [1] }, { idempotencyKey: key });
    const b = await client.submit({ handler: "echo", items: [1], idempotency_key: key });
    assert.equal(a.idempotency_key, key);
    assert.equal(b.id, a.id, "the repeat answers with the same batch");
  });

  test("a key given twice must agree", async () => {
    await assert.rejects(
      client.submit({ handler: "echo", items: [1], idempotency_key: "a" }, { idempotencyKey: "b" }),
      TypeError,
    );
  });

  test("without a key each call generates its own", async () => {
    const a = await client.submit({ handler: "echo", items: [1] });
    const b = await client.submit({ handler: "echo", items: [1] });
    assert.notEqual(a.id, b.id);
    assert.notEqual(a.idempotency_key, b.idempotency_key);
  });
});

describe("configuration", () => {
  test("baseUrl and token come from BATCH_SUPERVISOR_URL and BATCH_SUPERVISOR_TOKEN", async () => {
    const saved = { ...process.env };
    try {
      process.env.BATCH_SUPERVISOR_URL = `${daemon.url}/`;
      process.env.BATCH_SUPERVISOR_TOKEN = "secret-token";
      const seen = [];
      const c = new Client({ fetch: (url, init) => (seen.push([url, init.headers]), fetch(url, init)) });
      assert.equal(c.baseUrl, daemon.url);
      await c.listBatches({ limit: 1 });
      assert.equal(seen[0][1].Authorization, "Bearer secret-token");
      delete process.env.BATCH_SUPERVISOR_URL;
      assert.equal(new Client().baseUrl, "http://127.0.0.1:8080");
      assert.equal(new Client({ baseUrl: "http://example.test" }).baseUrl, "http://example.test");
    } finally {
      process.env = saved;
    }
  });
});

describe("watching through a daemon restart", () => {
  test("the stream reconnects with Last-Event-ID and still ends with end", async () => {
    const n = 24;
    const items = Array.from({ length: n }, (_, i) => ({ key: `r${i}`, payload: { sleep: 0.4 } }));
    const batch = await client.submit({ handler: "echo", items, max_concurrency: 4 });
    const keys = new Set();
    let restarted = null;
    let snapshots = 0;
    const connections = []; // the Last-Event-ID each connection to the stream sent
    const counting = new Client({
      baseUrl: daemon.url,
      fetch: (url, init) => {
        if (String(url).endsWith("/events")) connections.push(init.headers["Last-Event-ID"] ?? null);
        return fetch(url, init);
      },
    });
    const versions = new Set();
    const final = await counting.watchBatch(batch.id, {
      lastEventId: String(batch.version),
      onSnapshot: (b) => {
        snapshots += 1;
        versions.add(String(b.version));
        restarted ??= daemon.restart(); // the first snapshot: restart while items run
      },
      onItem: (it) => keys.add(it.key),
    });
    await restarted;
    assert.equal(final.status, "completed");
    assert.equal(keys.size, n, "every item event arrived (at least once)");
    assert.ok(snapshots >= 2, "a snapshot from each connection");
    assert.equal(connections[0], String(batch.version));
    const resumed = connections.slice(1);
    assert.ok(resumed.length >= 1, `reconnected with Last-Event-ID: ${JSON.stringify(connections)}`);
    assert.ok(versions.has(resumed[0]), "the id of a snapshot received before the drop");
  });

  test("a daemon killed mid-stream (connection reset): the watch reconnects and ends", async () => {
    const items = Array.from({ length: 8 }, (_, i) => ({ key: `x${i}`, payload: { sleep: 0.3 } }));
    const batch = await client.submit({ handler: "echo", items, max_concurrency: 2 });
    const keys = new Set();
    let crashed = null;
    const final = await client.watchBatch(batch.id, {
      lastEventId: String(batch.version),
      onItem: (it) => {
        keys.add(it.key);
        crashed ??= daemon.crash(); // after the first finished item
      },
    });
    await crashed;
    assert.equal(final.status, "completed");
    assert.equal(keys.size, 8);
  });

  test("an aborted watch rejects promptly with the abort reason", async () => {
    const batch = await client.submit({ handler: "sleeper", items: [{ sleep: 3600 }] });
    const ac = new AbortController();
    const watching = client.watchBatch(batch.id, { signal: ac.signal, onSnapshot: () => ac.abort(new Error("enough")) });
    await assert.rejects(watching, /enough/);
    await client.cancel(batch.id);
    await waitFor(async () => (await client.getBatch(batch.id)).status === "cancelled", { what: "cancelled" });
  });
});
