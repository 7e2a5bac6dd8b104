/**
 * The API client: one `Client` per daemon (or load balancer) address. Uses only
 * the platform's `fetch`, so it runs in Node 18+, browsers, Deno, Bun and edge
 * runtimes. Requests that are safe to repeat are retried on connection errors
 * and 503 (a draining or not-yet-ready daemon), a bounded number of times with
 * backoff; `submit` is made safe to repeat by an idempotency key.
 */

import { CsvRows } from "./csv.js";
import { ApiError, ConnectionError } from "./errors.js";
import { readEvents, readLines } from "./lines.js";
import {
  abortReason,
  backoffMs,
  childController,
  env,
  randomUUID,
  sleep,
} from "./platform.js";
import type {
  Batch,
  BatchEvent,
  BatchList,
  BatchStatus,
  EndEvent,
  Item,
  ItemEvent,
  ItemList,
  ItemStatus,
  ItemWithErrors,
  ProgressEvent,
  ResultRecord,
  Submission,
} from "./types.js";

/** Where the Python CLI talks to when nothing says otherwise. */
export const DEFAULT_URL = "http://127.0.0.1:8080";

export interface ClientOptions {
  /** The API's base URL; default BATCH_SUPERVISOR_URL (Node), the page's origin (browser), else DEFAULT_URL. */
  baseUrl?: string;
  /** A bearer token; default BATCH_SUPERVISOR_TOKEN (Node). `null`: send none. */
  token?: string | null;
  /** Retries of a repeatable request after a connection error or a 503 (default 4). */
  maxRetries?: number;
  /** A fetch implementation (default the global one). */
  fetch?: typeof fetch;
}

export interface CallOptions {
  signal?: AbortSignal;
}

export interface SubmitOptions extends CallOptions {
  /** Used when `batch.idempotency_key` is not set; default a fresh random UUID. */
  idempotencyKey?: string;
}

export interface ListItemsOptions extends CallOptions {
  status?: ItemStatus | ItemStatus[];
  cursor?: string | null;
  /** Page size, at most 500. */
  limit?: number;
}

export interface ListBatchesOptions extends CallOptions {
  status?: BatchStatus | BatchStatus[];
  handler?: string;
  exclusiveKey?: string;
  cursor?: string | null;
  limit?: number;
}

export interface ResultsOptions extends CallOptions {
  /** `jsonl` (default): parsed records; `csv`: each row's cells, the header row first. */
  format?: "jsonl" | "csv";
  /** Only items in these statuses. */
  status?: ItemStatus | ItemStatus[];
  /** Start after this item id (the last one an earlier run got). */
  after?: string;
  /** Consecutive failed attempts before giving up (default 10). */
  maxReconnects?: number;
  /** A connection silent this long is dropped and resumed (default 60 s). */
  idleTimeoutMs?: number;
}

export interface EventsOptions extends CallOptions {
  /** Resume after this event id (a batch version), as a reconnect would. */
  lastEventId?: string;
  /** Consecutive failed connections before giving up (default 10). */
  maxReconnects?: number;
  /** A stream silent this long is dropped and reopened (default 60 s; the server sends a keepalive every 15 s). */
  idleTimeoutMs?: number;
}

export interface WatchOptions extends EventsOptions {
  onSnapshot?: (batch: Batch) => void | Promise<void>;
  onItem?: (item: ItemEvent) => void | Promise<void>;
  onProgress?: (progress: ProgressEvent) => void | Promise<void>;
  onEnd?: (end: EndEvent) => void | Promise<void>;
}

interface RequestSpec extends CallOptions {
  query?: Record<string, string | number | undefined | null>;
  body?: unknown;
  headers?: Record<string, string>;
  /** Whether a connection error or a 503 may be retried (the request is repeatable). */
  repeatable: boolean;
}

const RETRY_AFTER_MAX_MS = 30_000;
const EVENT_NAMES = new Set(["snapshot", "item", "progress", "end"]);

class Interrupted extends Error {
  override readonly name = "Interrupted";
}

export class Client {
  readonly baseUrl: string;
  readonly #token: string | null;
  readonly #maxRetries: number;
  readonly #fetch: typeof fetch;

  constructor(options: ClientOptions = {}) {
    const origin = (globalThis as { location?: { origin?: string } }).location?.origin;
    const base =
      options.baseUrl ??
      env("BATCH_SUPERVISOR_URL") ??
      (origin && origin !== "null" ? origin : undefined) ??
      DEFAULT_URL;
    this.baseUrl = base.replace(/\/+$/, "");
    this.#token = options.token === undefined ? (env("BATCH_SUPERVISOR_TOKEN") ?? null) : options.token;
    this.#maxRetries = options.maxRetries ?? 4;
    const f = options.fetch;
    // Called unbound, a browser's fetch throws "Illegal invocation".
    this.#fetch = f ?? ((input, init) => globalThis.fetch(input, init));
  }

  // -- batches

  /**
   * Submit a batch (201), or get the batch an earlier identical submission with
   * the same idempotency key created (200). The key is `batch.idempotency_key`,
   * else `options.idempotencyKey`, else a random UUID, so a request whose answer
   * was lost can be sent again without creating a second batch.
   */
  async submit(batch: Submission, options: SubmitOptions = {}): Promise<Batch> {
    const given = batch.idempotency_key ?? undefined;
    if (given !== undefined && options.idempotencyKey !== undefined && given !== options.idempotencyKey) {
      throw new TypeError("submit: batch.idempotency_key and options.idempotencyKey differ");
    }
    const key = given ?? options.idempotencyKey ?? (await randomUUID());
    // A header carries only printable ASCII (fetch throws otherwise); the body
    // field alone is enough, the header is a courtesy to proxies and logs.
    const header = /^[\x20-\x7e]*$/.test(key) ? { "Idempotency-Key": key } : undefined;
    return this.#json<Batch>("POST", "/v1/batches", {
      body: { ...batch, idempotency_key: key },
      headers: header,
      repeatable: true,
      signal: options.signal,
    });
  }

  getBatch(id: string, options: CallOptions = {}): Promise<Batch> {
    return this.#json("GET", `/v1/batches/${enc(id)}`, { repeatable: true, ...options });
  }

  /** One page of batches, newest first. */
  listBatches(options: ListBatchesOptions = {}): Promise<BatchList> {
    const { status, handler, exclusiveKey, cursor, limit, signal } = options;
    return this.#json("GET", "/v1/batches", {
      query: { status: list(status), handler, exclusive_key: exclusiveKey, cursor, limit },
      repeatable: true,
      signal,
    });
  }

  /** One page of a batch's items; pass `next_cursor` back as `cursor` for the next. */
  listItems(id: string, options: ListItemsOptions = {}): Promise<ItemList> {
    const { status, cursor, limit, signal } = options;
    return this.#json("GET", `/v1/batches/${enc(id)}/items`, {
      query: { status: list(status), cursor, limit },
      repeatable: true,
      signal,
    });
  }

  /** Every item of a batch, page by page. */
  async *items(id: string, options: Omit<ListItemsOptions, "cursor"> = {}): AsyncGenerator<Item> {
    let cursor: string | null = null;
    do {
      const page: ItemList = await this.listItems(id, { ...options, cursor });
      yield* page.items;
      cursor = page.next_cursor;
    } while (cursor);
  }

  /** An item with its error history. */
  getItem(id: string, options: CallOptions = {}): Promise<ItemWithErrors> {
    return this.#json("GET", `/v1/items/${enc(id)}`, { repeatable: true, ...options });
  }

  // -- controls (cancel, pause and resume are idempotent; retry is not repeated)

  cancel(id: string, options: CallOptions = {}): Promise<Batch> {
    return this.#json("POST", `/v1/batches/${enc(id)}/cancel`, { repeatable: true, ...options });
  }

  pause(id: string, options: CallOptions = {}): Promise<Batch> {
    return this.#json("POST", `/v1/batches/${enc(id)}/pause`, { repeatable: true, ...options });
  }

  resume(id: string, options: CallOptions = {}): Promise<Batch> {
    return this.#json("POST", `/v1/batches/${enc(id)}/resume`, { repeatable: true, ...options });
  }

  /** Requeue failed items (and cancelled ones with `includeCancelled`). */
  retry(id: string, options: CallOptions & { includeCancelled?: boolean } = {}): Promise<Batch> {
    const { includeCancelled, signal } = options;
    return this.#json("POST", `/v1/batches/${enc(id)}/retry`, {
      body: includeCancelled === undefined ? undefined : { include_cancelled: includeCancelled },
      repeatable: false, // a repeat after a lost answer would be a 409 "nothing to retry"
      signal,
    });
  }

  // -- results

  /**
   * Every item's outcome in item id order, read from the streamed export. A
   * dropped or cut connection, a silent one or a 503 is resumed with
   * `after=<the last id received>`, so each record comes exactly once.
   */
  results(id: string, options?: ResultsOptions & { format?: "jsonl" }): AsyncGenerator<ResultRecord>;
  results(id: string, options: ResultsOptions & { format: "csv" }): AsyncGenerator<string[]>;
  async *results(id: string, options: ResultsOptions = {}): AsyncGenerator<ResultRecord | string[]> {
    const format = options.format ?? "jsonl";
    const maxReconnects = options.maxReconnects ?? 10;
    const idleMs = options.idleTimeoutMs ?? 60_000;
    let after = options.after;
    let headerSent = false;
    let failures = 0;
    const path = `/v1/batches/${enc(id)}/results`;
    for (;;) {
      const watch = idleWatch(options.signal, idleMs);
      try {
        const resp = await this.#send("GET", path, {
          query: { format, status: list(options.status), after },
          headers: { Accept: format === "csv" ? "text/csv" : "application/x-ndjson" },
          repeatable: false,
          signal: watch.signal,
        });
        if (resp.status === 503) throw new Interrupted(await problemText(resp));
        if (!resp.ok) throw await apiError(resp, "GET", this.#url(path));
        if (resp.body === null) throw new Interrupted("no response body");
        if (format === "jsonl") {
          for await (const { line, complete } of readLines(resp.body, watch.arm)) {
            if (!complete) throw new Interrupted("the response ended inside a record");
            if (!line.trim()) continue;
            const rec = JSON.parse(line) as ResultRecord;
            after = rec.id;
            failures = 0;
            watch.pause();
            yield rec;
            watch.arm();
          }
        } else {
          const rows = new CsvRows();
          let header = true;
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          try {
            for (;;) {
              const { value, done } = await reader.read();
              if (done) break;
              watch.arm();
              for (const row of rows.push(value)) {
                if (header) {
                  header = false; // every response starts with it: passed on once
                  if (headerSent) continue;
                  headerSent = true;
                } else {
                  after = row[0];
                  failures = 0;
                }
                watch.pause();
                yield row;
                watch.arm();
              }
            }
          } finally {
            await reader.cancel().catch(() => {});
          }
          if (rows.partial) throw new Interrupted("the response ended inside a record");
        }
        return;
      } catch (err) {
        if (options.signal?.aborted) throw abortReason(options.signal);
        if (err instanceof ApiError || err instanceof SyntaxError) throw err;
        failures += 1;
        if (failures > maxReconnects) {
          throw new ConnectionError(
            `GET ${this.#url(path)}: gave up after ${maxReconnects} retries: ${describe(err)}`,
            { cause: err },
          );
        }
      } finally {
        watch.done();
      }
      await sleep(backoffMs(failures), options.signal);
    }
  }

  // -- live progress

  /**
   * The batch's Server-Sent Events (`snapshot`, `item`, `progress`, and `end`
   * last), reconnecting with backoff and `Last-Event-ID` when the stream drops
   * or a draining daemon closes it. Ends after `end`; an error response other
   * than 503 or 429 is thrown as ApiError (404: no such batch).
   */
  async *events(id: string, options: EventsOptions = {}): AsyncGenerator<BatchEvent> {
    const maxReconnects = options.maxReconnects ?? 10;
    const idleMs = options.idleTimeoutMs ?? 60_000;
    const path = `/v1/batches/${enc(id)}/events`;
    let last = options.lastEventId ?? null;
    let retryMs: number | null = null;
    let failures = 0;
    let lastError: unknown = new Interrupted("the stream ended before `end`");
    for (;;) {
      const watch = idleWatch(options.signal, idleMs);
      try {
        const headers: Record<string, string> = { Accept: "text/event-stream" };
        if (last !== null) headers["Last-Event-ID"] = last;
        const resp = await this.#send("GET", path, {
          headers,
          repeatable: false,
          signal: watch.signal,
        });
        if (resp.status === 503 || resp.status === 429) throw new Interrupted(await problemText(resp));
        if (!resp.ok) throw await apiError(resp, "GET", this.#url(path));
        if (resp.body === null) throw new Interrupted("no response body");
        for await (const msg of readEvents(resp.body, watch.arm)) {
          if (msg.retry !== null) retryMs = msg.retry;
          if (msg.lastEventId !== null) last = msg.lastEventId;
          if (!EVENT_NAMES.has(msg.event)) continue;
          failures = 0;
          const event = { event: msg.event, id: msg.id, data: JSON.parse(msg.data) } as BatchEvent;
          watch.pause();
          yield event;
          if (event.event === "end") return;
          watch.arm();
        }
        lastError = new Interrupted("the stream ended before `end`");
      } catch (err) {
        if (options.signal?.aborted) throw abortReason(options.signal);
        if (err instanceof ApiError || err instanceof SyntaxError) throw err;
        lastError = err;
      } finally {
        watch.done();
      }
      failures += 1;
      if (failures > maxReconnects) {
        throw new ConnectionError(
          `GET ${this.#url(path)}: lost the event stream: ${describe(lastError)}`,
          { cause: lastError },
        );
      }
      await sleep(retryMs ?? backoffMs(failures), options.signal);
    }
  }

  /**
   * Follow a batch until it is terminal, calling the handlers for each event in
   * order; resolves with the terminal snapshot.
   */
  async watchBatch(id: string, options: WatchOptions = {}): Promise<Batch> {
    let final: Batch | null = null;
    for await (const e of this.events(id, options)) {
      if (e.event === "snapshot") {
        final = e.data;
        await options.onSnapshot?.(e.data);
      } else if (e.event === "item") await options.onItem?.(e.data);
      else if (e.event === "progress") await options.onProgress?.(e.data);
      else await options.onEnd?.(e.data);
    }
    return final ?? this.getBatch(id, { signal: options.signal });
  }

  // -- plumbing

  #url(path: string, query?: RequestSpec["query"]): string {
    const url = new URL(this.baseUrl + path);
    for (const [k, v] of Object.entries(query ?? {})) {
      if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
    }
    return url.toString();
  }

  /** The response to one request; connection errors and 503 retried when repeatable. */
  async #send(method: string, path: string, spec: RequestSpec): Promise<Response> {
    const url = this.#url(path, spec.query);
    const headers: Record<string, string> = { Accept: "application/json", ...spec.headers };
    if (this.#token) headers.Authorization = `Bearer ${this.#token}`;
    // The API refuses changes without it, even with no body (its CSRF guard).
    if (method !== "GET") headers["Content-Type"] = "application/json";
    const body = spec.body === undefined ? undefined : JSON.stringify(spec.body);
    for (let attempt = 0; ; attempt++) {
      const retriesLeft = spec.repeatable && attempt < this.#maxRetries;
      let resp: Response;
      try {
        resp = await this.#fetch(url, { method, headers, body, signal: spec.signal ?? null });
      } catch (err) {
        if (spec.signal?.aborted) throw abortReason(spec.signal);
        if (!retriesLeft) {
          throw new ConnectionError(`${method} ${url}: no response: ${describe(err)}`, { cause: err });
        }
        await sleep(backoffMs(attempt + 1), spec.signal);
        continue;
      }
      if (resp.status === 503 && retriesLeft) {
        await resp.body?.cancel().catch(() => {});
        const wait = retryAfterMs(resp.headers.get("Retry-After")) ?? backoffMs(attempt + 1);
        await sleep(Math.min(wait, RETRY_AFTER_MAX_MS), spec.signal);
        continue;
      }
      return resp;
    }
  }

  async #json<T>(method: string, path: string, spec: RequestSpec): Promise<T> {
    const resp = await this.#send(method, path, spec);
    const url = this.#url(path, spec.query);
    if (!resp.ok) throw await apiError(resp, method, url);
    const text = await resp.text();
    try {
      return (text ? JSON.parse(text) : null) as T;
    } catch {
      throw new ConnectionError(
        `${method} ${url}: ${resp.status} but the body is not JSON (is this a batch-supervisor API?)`,
      );
    }
  }
}

/** Ids go into paths; an id from user input must not change the route. */
function enc(id: string): string {
  return encodeURIComponent(id);
}

function list<T extends string>(value: T | T[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(",") : value;
}

async function apiError(resp: Response, method: string, url: string): Promise<ApiError> {
  return new ApiError(method, url, resp.status, resp.headers, await resp.text().catch(() => ""));
}

async function problemText(resp: Response): Promise<string> {
  const body = await resp.text().catch(() => "");
  return `${resp.status} ${body.trim().slice(0, 200)}`;
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const cause = err.cause instanceof Error ? ` (${err.cause.message})` : "";
    return `${err.message}${cause}`;
  }
  return String(err);
}

/** Milliseconds from a Retry-After value (delay-seconds or an HTTP date). */
function retryAfterMs(value: string | null): number | null {
  if (value === null) return null;
  const v = value.trim();
  if (/^[0-9]+$/.test(v)) return Number(v) * 1000;
  const when = Date.parse(v);
  return Number.isNaN(when) ? null : Math.max(0, when - Date.now());
}

/**
 * A signal for one streamed response that aborts when `parent` does or when no
 * data arrived for `idleMs` while armed (paused while the caller holds a record).
 */
function idleWatch(parent: AbortSignal | undefined, idleMs: number) {
  const { controller, release } = childController(parent);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const pause = () => {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
  };
  const arm = () => {
    pause();
    timer = setTimeout(
      () => controller.abort(new Interrupted(`no data for ${idleMs} ms`)),
      idleMs,
    );
  };
  arm();
  return {
    signal: controller.signal,
    arm,
    pause,
    done: () => {
      pause();
      release();
      controller.abort(); // closes the connection if the body was not read to its end
    },
  };
}
