/**
 * Checking that a request really comes from an http handler (supervisor/handlers/http.py).
 *
 * With `signing_secret` set, each attempt's POST carries
 * `X-Supervisor-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`,
 * and the body's `sent_at` (unix seconds, covered by the signature) says when it
 * was sent. A request verifies when the HMAC matches (compared in constant time)
 * and `sent_at` is within the tolerance of this clock, so a captured request
 * replayed later is refused. The `X-Supervisor-Timestamp` header is not signed
 * and is not used. Web Crypto only: works in Node 18+, Deno, Bun and edge runtimes.
 */

import { webCrypto } from "./platform.js";
import type { WebhookDelivery } from "./types.js";

export const SIGNATURE_HEADER = "X-Supervisor-Signature";
/** How far `sent_at` may be from this clock, as docs/handlers.md recommends. */
export const DEFAULT_TOLERANCE_S = 300;

/** Node's IncomingHttpHeaders, or any plain record of header values. */
export type HeaderRecord = Record<string, string | string[] | undefined>;

/** A request already read: its raw body, and its headers or just the signature. */
export interface WebhookInput {
  body: string | Uint8Array | ArrayBuffer;
  headers?: Headers | HeaderRecord;
  /** The `X-Supervisor-Signature` value, if not given through `headers`. */
  signature?: string | null;
}

export interface VerifyOptions {
  /** Seconds `sent_at` may differ from now (default 300). */
  toleranceSeconds?: number;
  /** The current time in ms (default `Date.now()`), for tests. */
  now?: number;
}

const encoder = new TextEncoder();

/**
 * The delivery (`{item, sent_at}`) when `input` is a genuine, fresh request from
 * the daemon's http handler signed with `secret`; null otherwise (answer 401, so
 * the item fails without retries). `input` is a Fetch `Request` (its body is
 * read) or `{body, headers}` with the raw body bytes as received.
 *
 *     const delivery = await verifyWebhook(request, secret);
 *     if (!delivery) return new Response("bad signature", { status: 401 });
 */
export async function verifyWebhook(
  input: Request | WebhookInput,
  secret: string,
  options: VerifyOptions = {},
): Promise<WebhookDelivery | null> {
  if (!secret) throw new TypeError("verifyWebhook: the signing secret is empty");
  let body: Uint8Array;
  let header: string | null | undefined;
  if (isRequest(input)) {
    header = input.headers.get(SIGNATURE_HEADER);
    if (!header) return null; // not even read: an unsigned request is refused as is
    body = new Uint8Array(await input.arrayBuffer());
  } else {
    header = input.signature ?? headerValue(input.headers, SIGNATURE_HEADER);
    body = toBytes(input.body);
  }
  if (!header?.startsWith("sha256=")) return null;
  const given = hexBytes(header.slice("sha256=".length).trim());
  if (given === null) return null;
  const crypto = await webCrypto();
  const key = await crypto.subtle.importKey(
    "raw",
    encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const expected = new Uint8Array(await crypto.subtle.sign("HMAC", key, body));
  if (!constantTimeEqual(given, expected)) return null;
  // Only now is the body trusted enough to parse.
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(body));
  } catch {
    return null;
  }
  if (parsed === null || typeof parsed !== "object") return null;
  const delivery = parsed as Partial<WebhookDelivery>;
  const sentAt = delivery.sent_at;
  if (typeof sentAt !== "number" || !Number.isInteger(sentAt)) return null;
  const tolerance = options.toleranceSeconds ?? DEFAULT_TOLERANCE_S;
  const now = (options.now ?? Date.now()) / 1000;
  if (!(Math.abs(now - sentAt) <= tolerance)) return null;
  if (delivery.item === null || typeof delivery.item !== "object") return null;
  return delivery as WebhookDelivery;
}

function isRequest(input: Request | WebhookInput): input is Request {
  return typeof (input as Request).arrayBuffer === "function" && "method" in input;
}

function headerValue(headers: Headers | HeaderRecord | undefined, name: string): string | null {
  if (headers === undefined) return null;
  if (typeof (headers as Headers).get === "function") return (headers as Headers).get(name);
  const lower = name.toLowerCase();
  for (const [k, v] of Object.entries(headers as HeaderRecord)) {
    if (k.toLowerCase() === lower) return Array.isArray(v) ? (v[0] ?? null) : (v ?? null);
  }
  return null;
}

function toBytes(body: string | Uint8Array | ArrayBuffer): Uint8Array {
  if (typeof body === "string") return encoder.encode(body);
  if (body instanceof Uint8Array) return body; // a Node Buffer is one too
  return new Uint8Array(body);
}

/** 32 bytes from 64 hex digits, else null. */
function hexBytes(hex: string): Uint8Array | null {
  if (!/^[0-9a-fA-F]{64}$/.test(hex)) return null;
  const out = new Uint8Array(32);
  for (let i = 0; i < 32; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Equal bytes, in a time that depends only on the (public) length. */
function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}
