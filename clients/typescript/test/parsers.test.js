// The stream parsers on bodies cut at every possible place: SSE framing as the
// HTML standard defines it, JSON Lines completeness, and CSV records with
// quoted commas, quotes and line breaks.

import assert from "node:assert/strict";
import { test } from "node:test";

import { CsvRows } from "../dist/csv.js";
import { readEvents, readLines } from "../dist/lines.js";

const encoder = new TextEncoder();

function body(chunks) {
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(typeof c === "string" ? encoder.encode(c) : c);
      controller.close();
    },
  });
}

/** Every way of cutting `text` in two (at byte boundaries, also inside a UTF-8 sequence). */
function* splits(text) {
  const bytes = encoder.encode(text);
  for (let i = 0; i <= bytes.length; i++) yield [bytes.slice(0, i), bytes.slice(i)];
}

async function collect(iterable) {
  const out = [];
  for await (const x of iterable) out.push(x);
  return out;
}

const STREAM =
  "id: 3\nevent: snapshot\ndata: {\"v\":3}\n\n" +
  ": keepalive\r\n\r\n" +
  "event: item\r\ndata: {\"k\":\"é\"}\r\n\r\n" +
  "event:progress\rdata:{\"a\":1}\rdata: {\"b\":2}\r\r" +
  "retry: 1500\nid: 4\nevent: end\ndata: {}\n\n" +
  "event: cut\ndata: never dispatched\n";

test("SSE: fields, comments, CRLF and CR line ends, multi-line data, ids; any cut", async () => {
  for (const chunks of splits(STREAM)) {
    const events = await collect(readEvents(body(chunks)));
    assert.deepEqual(
      events.map((e) => [e.event, e.data, e.id, e.lastEventId]),
      [
        ["snapshot", '{"v":3}', "3", "3"],
        ["item", '{"k":"é"}', null, "3"],
        ["progress", '{"a":1}\n{"b":2}', null, "3"],
        ["end", "{}", "4", "4"],
      ],
    );
    assert.equal(events[3].retry, 1500);
  }
});

test("lines: the last one is marked incomplete when the body does not end it", async () => {
  assert.deepEqual(await collect(readLines(body(["a\n", "b\r\n", "c"]))), [
    { line: "a", complete: true },
    { line: "b", complete: true },
    { line: "c", complete: false },
  ]);
  assert.deepEqual(await collect(readLines(body(["a\r", "\nb\n"]))), [
    { line: "a", complete: true },
    { line: "b", complete: true },
  ]);
});

test("CSV: quoted commas, doubled quotes and line breaks stay in their cell; any cut", () => {
  const text = 'id,key,result\r\n1,"a,b","{""x"":""1\r\n2""}"\r\n2,,""\r\n';
  for (let i = 0; i <= text.length; i++) {
    const rows = new CsvRows();
    const out = [...rows.push(text.slice(0, i)), ...rows.push(text.slice(i))];
    assert.deepEqual(out, [
      ["id", "key", "result"],
      ["1", "a,b", '{"x":"1\r\n2"}'],
      ["2", "", ""],
    ]);
    assert.equal(rows.partial, false);
  }
  const cut = new CsvRows();
  cut.push('1,"open\r\n');
  assert.equal(cut.partial, true, "a body ending inside a record was cut");
});
