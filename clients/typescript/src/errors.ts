/** The errors the client throws: the API's problems, and requests that got no answer. */

import type { FieldError, Problem } from "./types.js";

/**
 * An error response from the API. The problem+json fields are properties
 * (`status`, `type`, `title`, `detail`, `errors` with JSON Pointer paths), and
 * `problem` is the whole body, with any extra members (`active_batch_id`, …).
 */
export class ApiError extends Error {
  override readonly name = "ApiError";
  readonly type: string;
  readonly title: string;
  readonly status: number;
  readonly detail: string;
  readonly instance: string | undefined;
  readonly errors: FieldError[];
  readonly problem: Problem & Record<string, unknown>;
  readonly method: string;
  readonly url: string;
  readonly headers: Headers;

  constructor(method: string, url: string, status: number, headers: Headers, body: string) {
    const problem = parseProblem(status, body);
    const extra = problem.errors
      ?.filter((e) => !problem.detail.includes(e.message))
      .map((e) => `${e.path || "/"}: ${e.message}`);
    const detail = extra?.length ? `${problem.detail}; ${extra.join("; ")}` : problem.detail;
    super(`${method} ${url}: ${status} ${detail}`);
    this.problem = problem;
    this.type = problem.type;
    this.title = problem.title;
    this.status = status;
    this.detail = problem.detail;
    this.instance = problem.instance;
    this.errors = problem.errors ?? [];
    this.method = method;
    this.url = url;
    this.headers = headers;
  }
}

/** The problem in `body`, or one made up from the status when it is not problem+json. */
function parseProblem(status: number, body: string): Problem & Record<string, unknown> {
  try {
    const parsed: unknown = JSON.parse(body);
    if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed)) {
      const p = parsed as Record<string, unknown>;
      const errors = Array.isArray(p.errors)
        ? p.errors
            .filter((e): e is Record<string, unknown> => e !== null && typeof e === "object")
            .map((e) => ({ path: String(e.path ?? ""), message: String(e.message ?? "") }))
        : undefined;
      return {
        ...p,
        type: typeof p.type === "string" ? p.type : "about:blank",
        title: typeof p.title === "string" ? p.title : `HTTP ${status}`,
        status: typeof p.status === "number" ? p.status : status,
        detail:
          typeof p.detail === "string" ? p.detail : typeof p.title === "string" ? p.title : "",
        ...(errors ? { errors } : {}),
      };
    }
  } catch {
    // Not JSON (a proxy's HTML error page): described by its text below.
  }
  const text = body.trim().slice(0, 500) || "(empty response)";
  return { type: "about:blank", title: `HTTP ${status}`, status, detail: text };
}

/**
 * A request that got no usable answer: the connection failed (after the
 * retries), a stream broke off too often, or the body was not what the API sends.
 * `cause` is the last underlying error.
 */
export class ConnectionError extends Error {
  override readonly name = "ConnectionError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}
