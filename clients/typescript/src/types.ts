/**
 * The API's JSON shapes, written by hand after `/v1/openapi.json`
 * (supervisor/api/static/openapi.json). test/openapi.test.js compiles a
 * type-level check generated from that document: every property of each schema
 * named in SCHEMA_TYPES exists here, with the same required/optional split, and
 * nothing here is missing from the schema.
 */

/** A JSON value (payloads, results, metadata). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export type BatchStatus =
  | "waiting"
  | "scheduled"
  | "queued"
  | "running"
  | "paused"
  | "cancelling"
  | "completed"
  | "completed_with_errors"
  | "failed"
  | "cancelled";

export type ItemStatus = "queued" | "running" | "succeeded" | "failed" | "cancelled";

/** A count, or a percentage such as `"10%"`, or null (no limit). */
export type MaxFailures = number | `${number}%` | null;

export interface Counts {
  total: number;
  queued: number;
  running: number;
  succeeded: number;
  failed: number;
  cancelled: number;
}

/** One failed attempt. `traceback` is shown to admin tokens only. */
export interface ErrorEntry {
  attempt: number;
  type: string;
  message: string;
  traceback?: string | null;
  at?: string;
  worker?: string | null;
}

export interface Callback {
  handler: string | null;
  state: "none" | "pending" | "running" | "succeeded" | "failed";
  attempts: number;
  error: ErrorEntry | null;
}

/** The latest progress a running item's handler reported. */
export interface Progress {
  done: number;
  total: number | null;
  note: string | null;
  attempt: number;
  reported_at: string;
}

export interface Batch {
  id: string;
  handler: string;
  tenant: string;
  status: BatchStatus;
  counts: Counts;
  /** (succeeded + failed + cancelled) / total, rounded to 4 places. */
  progress: number;
  priority: number;
  max_concurrency: number | null;
  max_failures: MaxFailures;
  max_attempts: number | null;
  metadata: { [key: string]: Json };
  idempotency_key: string | null;
  exclusive_key: string | null;
  after: string[];
  after_policy: "completed" | "terminal" | null;
  /** While `waiting`: the dependencies that have not ended (null in listings). */
  waiting_on: string[] | null;
  not_before: string | null;
  /** Increases with every change; the ETag and the SSE event id. */
  version: number;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  callback: Callback;
  max_items: number | null;
}

export interface Item {
  /** A decimal string (item ids are 64-bit). */
  id: string;
  batch_id: string;
  key: string | null;
  status: ItemStatus;
  payload: Json;
  result: Json;
  attempts: number;
  max_attempts: number;
  error: ErrorEntry | null;
  run_after: string | null;
  worker: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  progress: Progress | null;
  /** Its key under its handler's `key_limit` (null without one). */
  limit_key: string | null;
}

/** `GET /v1/items/{id}`: the item with its error history (the last 20 attempts). */
export interface ItemWithErrors extends Item {
  errors: ErrorEntry[];
  errors_dropped: number;
}

export interface ItemSpec {
  key?: string | null;
  payload: Json;
}

/** The body of `POST /v1/batches`. An entry of `items` is an ItemSpec or a bare payload. */
export interface Submission {
  handler: string;
  items: (ItemSpec | Json)[];
  priority?: number | null;
  max_concurrency?: number | null;
  max_attempts?: number | null;
  max_failures?: MaxFailures;
  metadata?: { [key: string]: Json } | null;
  idempotency_key?: string | null;
  on_complete?: string | null;
  exclusive_key?: string | null;
  after?: string[] | null;
  after_policy?: "completed" | "terminal" | null;
  on_conflict?: "reject" | "queue" | null;
  max_items?: number | null;
  /** RFC 3339 with an offset; the batch is `scheduled` until then. */
  not_before?: string | null;
}

export interface BatchList {
  batches: Batch[];
  next_cursor: string | null;
}

export interface ItemList {
  items: Item[];
  next_cursor: string | null;
}

/** One record of `GET /v1/batches/{id}/results` (JSON Lines). */
export interface ResultRecord {
  id: string;
  key: string | null;
  status: ItemStatus;
  attempts: number;
  result: Json;
  error: ErrorEntry | null;
}

export interface FieldError {
  /** A JSON Pointer into the request body (`/items/3/key`), or the query parameter. */
  path: string;
  message: string;
}

/** An RFC 9457 problem, as every error response carries it. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  instance?: string;
  errors?: FieldError[];
  active_batch_id?: string;
  exclusive_key?: string;
  dependency_batch_id?: string;
  dependency_status?: string;
  /** Item controls' 409: the item's status and its batch. */
  item_status?: string;
  batch_id?: string;
  /** A bulk item retry's 409: the chosen items, each with why it was not retried. */
  skipped?: SkippedItem[];
}

/** One item a bulk retry (`POST /v1/batches/{id}/items/retry`) did not retry. */
export interface SkippedItem {
  id: string;
  /** Its status (null: no such item in this batch). */
  status: string | null;
  reason: string;
}

// -- Server-Sent Events of GET /v1/batches/{id}/events (supervisor/api/sse.py)

/** `event: item`: an item reached a terminal state. */
export interface ItemEvent {
  id: string;
  key: string | null;
  status: ItemStatus;
  error: ErrorEntry | null;
}

/** `event: progress`: a running item's handler reported progress. */
export interface ProgressEvent extends Progress {
  id: string;
  key: string | null;
}

/** `event: end`: the batch is terminal; the stream closes after it. */
export interface EndEvent {
  batch_id: string;
  status: BatchStatus;
}

/** One event of a batch's stream; `id` is the batch version (snapshots and end). */
export type BatchEvent =
  | { event: "snapshot"; id: string | null; data: Batch }
  | { event: "item"; id: string | null; data: ItemEvent }
  | { event: "progress"; id: string | null; data: ProgressEvent }
  | { event: "end"; id: string | null; data: EndEvent };

// -- The http handler's request body (supervisor/handlers/http.py)

/** The item as an http handler receives it. */
export interface WebhookItem {
  id: string;
  batch_id: string;
  key: string | null;
  payload: Json;
  attempt: number;
  max_attempts: number;
  handler: string;
  batch_metadata: { [key: string]: Json };
}

/** A verified http handler request: the item and when the attempt was sent (unix s). */
export interface WebhookDelivery {
  item: WebhookItem;
  sent_at: number;
}
