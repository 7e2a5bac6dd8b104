/**
 * Text streams cut into lines and Server-Sent Events, over fetch's body with
 * TextDecoderStream (no EventSource: it cannot send an Authorization header).
 */

/**
 * The lines of a UTF-8 body, without their ends (`\n`, `\r\n` or a lone `\r`).
 * `complete` is false for a last line the body did not end, which for JSON
 * Lines means the response was cut inside a record.
 */
export async function* readLines(
  body: ReadableStream<Uint8Array>,
  onChunk?: () => void,
): AsyncGenerator<{ line: string; complete: boolean }> {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let pendingCR = false; // the last chunk ended with \r: a following \n belongs to it
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onChunk?.();
      let text = value;
      if (pendingCR && text.startsWith("\n")) text = text.slice(1);
      pendingCR = false;
      buf += text;
      let start = 0;
      for (;;) {
        const nl = buf.indexOf("\n", start);
        const cr = buf.indexOf("\r", start);
        if (nl < 0 && cr < 0) break;
        let end: number;
        let next: number;
        if (cr >= 0 && (nl < 0 || cr < nl)) {
          end = cr;
          if (cr + 1 === buf.length) {
            pendingCR = true;
            next = cr + 1;
          } else {
            next = buf[cr + 1] === "\n" ? cr + 2 : cr + 1;
          }
        } else {
          end = nl;
          next = nl + 1;
        }
        yield { line: buf.slice(start, end), complete: true };
        start = next;
      }
      buf = buf.slice(start);
    }
    if (buf) yield { line: buf, complete: false };
  } finally {
    // Stopped early (break, an error): cancelling closes the connection too.
    await reader.cancel().catch(() => {});
  }
}

/** One dispatched Server-Sent Event. */
export interface SseMessage {
  event: string;
  data: string;
  /** This event's own `id:` field, if it had one. */
  id: string | null;
  /** The last event id seen on this stream so far (persists across events). */
  lastEventId: string | null;
  /** A `retry:` field the server sent, in ms. */
  retry: number | null;
}

/** The events of a text/event-stream body, parsed as the HTML standard says. */
export async function* readEvents(
  body: ReadableStream<Uint8Array>,
  onChunk?: () => void,
): AsyncGenerator<SseMessage> {
  let event = "";
  let id: string | null = null;
  let data: string[] = [];
  let lastEventId: string | null = null;
  let retry: number | null = null;
  let first = true;
  for await (const { line: raw } of readLines(body, onChunk)) {
    let line = raw;
    if (first) {
      first = false;
      if (line.startsWith("\uFEFF")) line = line.slice(1);
    }
    if (line === "") {
      if (data.length > 0) {
        yield { event: event || "message", data: data.join("\n"), id, lastEventId, retry };
      }
      event = "";
      id = null;
      data = [];
      continue;
    }
    if (line.startsWith(":")) continue; // a comment: the server's keepalive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) id = lastEventId = value;
    else if (field === "retry" && /^[0-9]+$/.test(value)) retry = Number(value);
  }
  // An event without its blank line was cut off: the standard discards it.
}
