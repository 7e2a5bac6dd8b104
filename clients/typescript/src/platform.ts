/**
 * What the client needs from its runtime, looked up so that one build works in
 * Node 18+, browsers and edge runtimes: environment variables (Node only), Web
 * Crypto (global from Node 19; `node:crypto` in Node 18) and abortable sleeps.
 */

interface MaybeProcess {
  process?: { env?: Record<string, string | undefined> };
}

/** An environment variable in Node; undefined where there is no `process.env`. */
export function env(name: string): string | undefined {
  const value = (globalThis as MaybeProcess).process?.env?.[name];
  return value === undefined || value === "" ? undefined : value;
}

let cryptoPromise: Promise<Crypto> | undefined;

/** Web Crypto: `globalThis.crypto`, or Node 18's `node:crypto` webcrypto. */
export function webCrypto(): Promise<Crypto> {
  cryptoPromise ??= (async () => {
    const global = (globalThis as { crypto?: Crypto }).crypto;
    if (global?.subtle !== undefined) return global;
    // A computed specifier: bundlers for the browser leave it alone.
    const specifier = "node:crypto";
    const mod = (await import(/* @vite-ignore */ specifier)) as { webcrypto?: Crypto };
    if (mod.webcrypto?.subtle === undefined) {
      throw new Error("no Web Crypto (crypto.subtle) in this runtime");
    }
    return mod.webcrypto;
  })();
  return cryptoPromise;
}

/** A fresh random UUID (idempotency keys). */
export async function randomUUID(): Promise<string> {
  const c = await webCrypto();
  if (typeof c.randomUUID === "function") return c.randomUUID();
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The reason an aborted signal carries, as something throwable. */
export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("This operation was aborted", "AbortError");
}

/** Wait `ms`, or reject with the abort reason as soon as `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortReason(signal));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal!));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * A controller aborted when `parent` aborts (AbortSignal.any is not in Node 18);
 * `release` detaches it from the parent once it is no longer needed.
 */
export function childController(parent?: AbortSignal): {
  controller: AbortController;
  release: () => void;
} {
  const controller = new AbortController();
  if (parent === undefined) return { controller, release: () => {} };
  if (parent.aborted) {
    controller.abort(abortReason(parent));
    return { controller, release: () => {} };
  }
  const onAbort = () => controller.abort(abortReason(parent));
  parent.addEventListener("abort", onAbort, { once: true });
  return { controller, release: () => parent.removeEventListener("abort", onAbort) };
}

/** Exponential backoff: 200 ms, 400 ms, … capped at `maxMs`, with ±20 % jitter. */
export function backoffMs(failures: number, maxMs = 5000): number {
  const base = Math.min(maxMs, 200 * 2 ** Math.max(0, failures - 1));
  return base * (0.8 + Math.random() * 0.4);
}
