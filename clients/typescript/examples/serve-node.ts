/**
 * Runs a Fetch-API handler (such as webhook-handler.ts) on Node's http module,
 * for trying it locally:
 *
 *     npm run build:examples
 *     SUPERVISOR_SIGNING_SECRET=… PORT=8787 node examples/dist/serve-node.js
 *
 * then point an http handler at it:
 *
 *     [handlers.resize]
 *     type = "http"
 *     url = "http://127.0.0.1:8787/"
 *     signing_secret = "…"   # the same secret
 */

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { pathToFileURL } from "node:url";

import handler, { type Env } from "./webhook-handler.js";

type FetchHandler = (request: Request, env: Env) => Promise<Response>;

/** The Fetch Request for a Node request, its body read in full (bytes as received). */
export async function toRequest(req: IncomingMessage): Promise<Request> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const headers = new Headers();
  for (const [name, value] of Object.entries(req.headers)) {
    if (value !== undefined) headers.set(name, Array.isArray(value) ? value.join(", ") : value);
  }
  const hasBody = req.method !== "GET" && req.method !== "HEAD";
  return new Request(new URL(req.url ?? "/", `http://${req.headers.host ?? "localhost"}`), {
    method: req.method,
    headers,
    body: hasBody ? Buffer.concat(chunks) : undefined,
  });
}

/** A Node http server answering every request with `fetchHandler`. */
export function serve(fetchHandler: FetchHandler, env: Env): Server {
  return createServer((req: IncomingMessage, res: ServerResponse) => {
    toRequest(req)
      .then((request) => fetchHandler(request, env))
      .then(async (response) => {
        res.writeHead(response.status, Object.fromEntries(response.headers));
        res.end(Buffer.from(await response.arrayBuffer()));
      })
      .catch((err: unknown) => {
        res.writeHead(500).end(String(err));
      });
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const secret = process.env.SUPERVISOR_SIGNING_SECRET;
  if (!secret) {
    console.error("set SUPERVISOR_SIGNING_SECRET to the handler's signing_secret");
    process.exit(2);
  }
  const port = Number(process.env.PORT ?? 8787);
  serve(handler.fetch, { SUPERVISOR_SIGNING_SECRET: secret }).listen(port, "127.0.0.1", () => {
    console.log(`webhook handler on http://127.0.0.1:${port}/`);
  });
}
