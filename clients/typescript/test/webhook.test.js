// verifyWebhook against requests signed by the daemon's real http handler: a
// tiny Node HTTP server is the handler's url and checks each request.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import { Client, verifyWebhook } from "../dist/index.js";
import { serve } from "../examples/dist/serve-node.js";
import example from "../examples/dist/webhook-handler.js";
import { startDaemon } from "./daemon.js";

const SECRET = "a long random string, shared with the daemon";
let daemon;
let client;
let server;
let exampleServer; // the example handler, run by the example's own Node adapter
const deliveries = []; // {body: Buffer, headers} of every request /hook received

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

async function handle(req, res) {
  const body = await readBody(req);
  if (req.url === "/hook") {
    deliveries.push({ body, headers: req.headers });
    const delivery = await verifyWebhook({ body, headers: req.headers }, SECRET);
    if (!delivery) {
      res.writeHead(401).end("bad signature");
      return;
    }
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(JSON.stringify({ verified: delivery.item.id, payload: delivery.item.payload }));
  } else {
    res.writeHead(404).end();
  }
}

before(async () => {
  server = createServer((req, res) => {
    handle(req, res).catch((err) => res.writeHead(500).end(String(err)));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const base = `http://127.0.0.1:${server.address().port}`;
  exampleServer = serve(example.fetch, { SUPERVISOR_SIGNING_SECRET: SECRET });
  await new Promise((resolve) => exampleServer.listen(0, "127.0.0.1", resolve));
  const exampleUrl = `http://127.0.0.1:${exampleServer.address().port}/`;
  const http = (url, extra = {}) => ({ type: "http", url, timeout: "10s", max_attempts: 1, ...extra });
  daemon = await startDaemon({
    handlers: {
      hook: http(`${base}/hook`, { signing_secret: SECRET }),
      hook_wrong_secret: http(`${base}/hook`, { signing_secret: "not the receiver's secret" }),
      hook_unsigned: http(`${base}/hook`),
      example: http(exampleUrl, { signing_secret: SECRET }),
    },
  });
  client = new Client({ baseUrl: daemon.url });
});

after(async () => {
  await daemon?.close();
  await new Promise((resolve) => server?.close(resolve));
  await new Promise((resolve) => exampleServer?.close(resolve));
});

async function run(handler, items) {
  const batch = await client.submit({ handler, items });
  const final = await client.watchBatch(batch.id);
  const records = [];
  for await (const r of client.results(batch.id)) records.push(r);
  return { final, records };
}

describe("requests from the real http handler", () => {
  test("a signed request verifies and its item is handed over", async () => {
    const { final, records } = await run("hook", [{ key: "one", payload: { n: 1 } }]);
    assert.equal(final.status, "completed");
    assert.equal(records[0].result.verified, records[0].id);
    assert.deepEqual(records[0].result.payload, { n: 1 });
  });

  test("another secret, or no signature: 401, and the item fails at once", async () => {
    for (const handler of ["hook_wrong_secret", "hook_unsigned"]) {
      const { final, records } = await run(handler, [1]);
      assert.equal(final.status, "failed", handler);
      assert.equal(records[0].error.type, "HTTPRejectedError");
      assert.match(records[0].error.message, /HTTP 401/);
      assert.equal(records[0].attempts, 1);
    }
  });

  test("the example serverless handler: verified items succeed, a bad payload fails", async () => {
    const { final, records } = await run("example", [
      { key: "ok", payload: { width: 640 } },
      { key: "bad", payload: { height: 1 } },
    ]);
    assert.equal(final.status, "completed_with_errors");
    assert.deepEqual(records[0].result, { item: records[0].id, attempt: 1, width: 640, resized: true });
    assert.match(records[1].error.message, /HTTP 422/);
  });
});

describe("checks on a captured delivery", () => {
  let captured; // a request the daemon signed, as received

  before(async () => {
    deliveries.length = 0;
    await run("hook", [{ key: "captured", payload: "x" }]);
    captured = deliveries.find((d) => d.headers["x-supervisor-signature"]);
    assert.ok(captured, "the daemon sent a signed request");
  });

  const sentAt = () => JSON.parse(captured.body).sent_at;

  test("it verifies from raw bytes, a string, or a Fetch Request", async () => {
    const sig = captured.headers["x-supervisor-signature"];
    assert.match(sig, /^sha256=[0-9a-f]{64}$/);
    const now = sentAt() * 1000;
    const fromBytes = await verifyWebhook({ body: captured.body, signature: sig }, SECRET, { now });
    assert.equal(fromBytes.item.key, "captured");
    assert.equal(fromBytes.sent_at, sentAt());
    assert.ok(await verifyWebhook({ body: captured.body.toString(), headers: captured.headers }, SECRET, { now }));
    const request = new Request("http://localhost/", {
      method: "POST",
      body: captured.body,
      headers: { "X-Supervisor-Signature": sig },
    });
    assert.ok(await verifyWebhook(request, SECRET, { now }));
  });

  test("a stale or future sent_at is refused, within the tolerance it is not", async () => {
    const ms = sentAt() * 1000;
    const input = () => ({ body: captured.body, headers: captured.headers });
    assert.ok(await verifyWebhook(input(), SECRET, { now: ms + 299_000 }));
    assert.equal(await verifyWebhook(input(), SECRET, { now: ms + 301_000 }), null, "replayed later");
    assert.equal(await verifyWebhook(input(), SECRET, { now: ms - 301_000 }), null, "from the future");
    assert.ok(await verifyWebhook(input(), SECRET, { now: ms + 3_000_000, toleranceSeconds: 3600 }));
  });

  test("a changed body, another secret or a malformed header is refused", async () => {
    const now = sentAt() * 1000;
    const sig = captured.headers["x-supervisor-signature"];
    const tampered = Buffer.from(captured.body);
    tampered[tampered.indexOf("captured")] ^= 1;
    assert.equal(await verifyWebhook({ body: tampered, signature: sig }, SECRET, { now }), null);
    // A later sent_at pasted into the body (to get past the freshness check) breaks the HMAC.
    const moved = Buffer.from(captured.body.toString().replace(`"sent_at":${sentAt()}`, `"sent_at":${sentAt() + 1}`));
    assert.notDeepEqual(moved, captured.body);
    assert.equal(await verifyWebhook({ body: moved, signature: sig }, SECRET, { now }), null);
    assert.equal(await verifyWebhook({ body: captured.body, signature: sig }, "other", { now }), null);
    for (const bad of [undefined, "", sig.slice(7), "sha1=" + sig.slice(7), sig.slice(0, -2), sig + "00", "sha256=zz" + sig.slice(9)]) {
      assert.equal(await verifyWebhook({ body: captured.body, signature: bad }, SECRET, { now }), null, String(bad));
    }
    await assert.rejects(verifyWebhook({ body: captured.body, signature: sig }, ""), TypeError);
  });
});

test("without a global crypto (Node 18) it falls back to node:crypto's Web Crypto", async () => {
  deliveries.length = 0;
  await run("hook", [{ key: "node18", payload: 1 }]);
  const d = deliveries.find((x) => x.headers["x-supervisor-signature"]);
  const script = `
    delete globalThis.crypto;
    if (globalThis.crypto !== undefined) throw new Error("crypto still global");
    const { verifyWebhook } = await import(${JSON.stringify(new URL("../dist/index.js", import.meta.url).href)});
    const env = process.env;
    const ok = await verifyWebhook({ body: Buffer.from(env.BODY, "base64"), signature: env.SIG }, env.SECRET);
    const bad = await verifyWebhook({ body: Buffer.from(env.BODY, "base64"), signature: env.SIG }, "other");
    console.log(JSON.stringify([ok?.item.key, bad]));`;
  const out = execFileSync(process.execPath, ["--input-type=module", "-e", script], {
    env: { ...process.env, BODY: d.body.toString("base64"), SIG: d.headers["x-supervisor-signature"], SECRET },
  });
  assert.deepEqual(JSON.parse(out), ["node18", null]);
});
