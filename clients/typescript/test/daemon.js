// A real daemon for these tests: spawns start_daemon.py (the Python suite's
// harness: an embedded PostgreSQL and `batch-supervisor run`) and talks to it
// over its stdin/stdout. Closing stdin stops both.

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, "../../..");

function python() {
  if (process.env.BSV_PYTHON) return process.env.BSV_PYTHON;
  const venv = path.join(ROOT, ".venv/bin/python");
  return existsSync(venv) ? venv : "python3";
}

/** Start a daemon with `spec` ({handlers, extra}); resolves once it is ready. */
export async function startDaemon(spec = {}) {
  const child = spawn(python(), [path.join(here, "start_daemon.py"), JSON.stringify(spec)], {
    cwd: ROOT,
    stdio: ["pipe", "pipe", "inherit"],
  });
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const exited = new Promise((resolve) => child.once("exit", (code) => resolve(code)));
  const next = async (what) => {
    const r = await Promise.race([lines.next(), exited.then((code) => ({ exit: code }))]);
    if ("exit" in r || r.done) throw new Error(`start_daemon.py exited (${r.exit}) before ${what}`);
    return JSON.parse(r.value);
  };
  const info = await next("the daemon was ready");
  return {
    url: info.url,
    config: info.config,
    /** SIGTERM the daemon (it drains: streams end) and start it again on its port. */
    async restart() {
      child.stdin.write("restart\n");
      await next("restarting");
    },
    /** SIGKILL the daemon (its connections reset mid-stream) and start it again. */
    async crash() {
      child.stdin.write("crash\n");
      await next("restarting after a crash");
    },
    async log() {
      child.stdin.write("log\n");
      return (await next("the log")).log;
    },
    async close() {
      child.stdin.end();
      await exited;
    },
  };
}

/** Poll `predicate` until it returns something truthy, or fail after `timeoutMs`. */
export async function waitFor(predicate, { timeoutMs = 15000, intervalMs = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await predicate();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
