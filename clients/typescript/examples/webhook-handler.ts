/**
 * A serverless function that IS an http handler: the daemon POSTs each item
 * here (`type = "http"`, `url = "https://…/resize"`, `signing_secret = "…"`), and
 * the function checks the signature before it trusts a byte of the body.
 *
 * The shape is the Fetch API's `(Request) => Response`, which Cloudflare
 * Workers, Deno (`deno serve`), Bun and Vercel/Next.js route handlers run as is;
 * the secret comes from the platform's environment (`SUPERVISOR_SIGNING_SECRET`).
 *
 * Outcomes, as the daemon reads them: 2xx succeeds and the JSON body is the
 * item's result; 401 fails the item at once; 503 (with Retry-After) retries it.
 */

import { verifyWebhook } from "batch-supervisor-client";

export interface Env {
  SUPERVISOR_SIGNING_SECRET: string;
}

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    if (request.method !== "POST") return new Response(null, { status: 405 });

    const delivery = await verifyWebhook(request, env.SUPERVISOR_SIGNING_SECRET);
    if (!delivery) return new Response("bad or stale signature", { status: 401 });

    const { item } = delivery;
    // At least once: the same item can arrive again (a retry, a lost answer),
    // so key side effects on item.id (stable across attempts).
    const payload = item.payload as { width?: number } | null;
    if (typeof payload?.width !== "number") {
      return new Response("payload needs a numeric width", { status: 422 }); // fails the item
    }
    const result = { item: item.id, attempt: item.attempt, width: payload.width, resized: true };
    return Response.json(result);
  },
};
