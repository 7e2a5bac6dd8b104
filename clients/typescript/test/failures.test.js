// Failures a real daemon cannot be made to produce on demand, from a scripted
// HTTP server: a stream that goes silent (no data, not even a keepalive), and
// 503s answered to a submission.

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, test } from "node:test";

import { ApiError, Client, ConnectionError } from "../dist/index.js";

let server;
let base;
let script; // (req, res, n) => void for the n-th request (0-based)
let requests;

before(async () => {
  server = createServer((req, res) => {
    const n = requests.length;
    requests.push({ method: req.method, url: req.url, headers: req.headers });
    script(req, res, n);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});

const batch = (status, version) => ({ id: "b1", status, version, counts: { total: 1 } });

test("a silent stream is dropped after idleTimeoutMs and resumed with Last-Event-ID", async () => {
  requests = [];
  script = (req, res, n) => {
    res.writeHead(200, { "Content-Type": "text/event-stream" });
    if (n === 0) {
      res.write(`id: 5\nevent: snapshot\ndata: ${JSON.stringify(batch("running", 5))}\n\n`);
      return; // and then nothing: a half-dead connection
    }
    res.write(`id: 7\nevent: snapshot\ndata: ${JSON.stringify(batch("completed", 7))}\n\n`);
    res.end(`id: 7\nevent: end\ndata: {"batch_id":"b1","status":"completed"}\n\n`);
  };
  const client = new Client({ baseUrl: base });
  const final = await client.watchBatch("b1", { idleTimeoutMs: 300 });
  assert.equal(final.status, "completed");
  assert.equal(requests.length, 2);
  assert.equal(requests[0].headers["last-event-id"], undefined);
  assert.equal(requests[1].headers["last-event-id"], "5");
  assert.equal(requests[1].headers.accept, "text/event-stream");
});

test("a stream that keeps failing gives up after maxReconnects with a ConnectionError", async () => {
  requests = [];
  script = (req, res) => res.writeHead(503, { "Content-Type": "application/problem+json" }).end("{}");
  const client = new Client({ baseUrl: base });
  await assert.rejects(client.watchBatch("b1", { maxReconnects: 2 }), (e) => e instanceof ConnectionError);
  assert.equal(requests.length, 3);
});

test("submit retries 503s with one idempotency key, in the body and the header", async () => {
  requests = [];
  const bodies = [];
  script = (req, res, n) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      bodies.push(JSON.parse(body));
      if (n < 2) {
        res.writeHead(503, { "Retry-After": "0", "Content-Type": "application/problem+json" });
        res.end(JSON.stringify({ type: "about:blank", title: "Service Unavailable", status: 503, detail: "draining" }));
        return;
      }
      res.writeHead(201, { "Content-Type": "application/json" }).end(JSON.stringify(batch("queued", 1)));
    });
  };
  const client = new Client({ baseUrl: base, token: "t0k" });
  const created = await client.submit({ handler: "echo", items: [1] });
  assert.equal(created.id, "b1");
  assert.equal(requests.length, 3);
  const keys = new Set(requests.map((r) => r.headers["idempotency-key"]));
  assert.equal(keys.size, 1);
  assert.deepEqual(new Set(bodies.map((b) => b.idempotency_key)), keys);
  assert.ok(requests.every((r) => r.headers.authorization === "Bearer t0k"));
  assert.ok(requests.every((r) => r.headers["content-type"] === "application/json"));
});

test("503s beyond maxRetries surface as the ApiError; retry() is never repeated", async () => {
  requests = [];
  script = (req, res) => {
    req.resume();
    res.writeHead(503, { "Retry-After": "0", "Content-Type": "application/problem+json" });
    res.end(JSON.stringify({ type: "about:blank", title: "Service Unavailable", status: 503, detail: "draining" }));
  };
  const client = new Client({ baseUrl: base, maxRetries: 1 });
  await assert.rejects(client.getBatch("b1"), (e) => e instanceof ApiError && e.status === 503 && e.detail === "draining");
  assert.equal(requests.length, 2);
  requests = [];
  await assert.rejects(client.retry("b1"), (e) => e instanceof ApiError && e.status === 503);
  assert.equal(requests.length, 1);
});

test("a body that is not JSON is a ConnectionError naming the URL", async () => {
  requests = [];
  script = (req, res) => res.writeHead(200, { "Content-Type": "text/html" }).end("<html>proxy</html>");
  const client = new Client({ baseUrl: base });
  await assert.rejects(client.getBatch("b1"), (e) => e instanceof ConnectionError && /not JSON/.test(e.message));
  script = (req, res) => res.writeHead(502, { "Content-Type": "text/html" }).end("<html>bad gateway</html>");
  await assert.rejects(
    client.getBatch("b1"),
    (e) => e instanceof ApiError && e.status === 502 && e.title === "HTTP 502" && /bad gateway/.test(e.detail),
  );
});
