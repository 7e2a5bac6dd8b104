// The hand-written types in src/types.ts against /v1/openapi.json
// (supervisor/api/static/openapi.json): a type-level assertion generated from
// the document is compiled with the TypeScript compiler. For each schema below,
// every property of the schema is a property of the TS type and the other way
// round, the schema's required properties are required in TS and its optional
// ones optional, and the enums are the same string unions.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));
const openapi = JSON.parse(
  readFileSync(path.resolve(here, "../../../supervisor/api/static/openapi.json"), "utf8"),
);

/** OpenAPI schema name → the exported TS type checked against it. */
const SCHEMA_TYPES = {
  Batch: "Batch",
  Item: "Item",
  ItemWithErrors: "ItemWithErrors",
  Submission: "Submission",
  ItemSpec: "ItemSpec",
  Counts: "Counts",
  ErrorEntry: "ErrorEntry",
  Callback: "Callback",
  Progress: "Progress",
  BatchList: "BatchList",
  ItemList: "ItemList",
  ResultRecord: "ResultRecord",
  Problem: "Problem",
  FieldError: "FieldError",
};
const ENUM_TYPES = { BatchStatus: "BatchStatus", ItemStatus: "ItemStatus" };

const union = (names) => (names.length ? names.map((n) => JSON.stringify(n)).join(" | ") : "never");

function assertion() {
  const schemas = openapi.components.schemas;
  const lines = [
    `import type * as T from "../src/types.js";`,
    // Resolves to true, or to the offending names (which the compiler then prints).
    `type None<K> = [K] extends [never] ? true : { offending: K };`,
    `type RequiredKeys<O> = { [K in keyof O]-?: {} extends Pick<O, K> ? never : K }[keyof O];`,
    `type OptionalKeys<O> = Exclude<keyof O, RequiredKeys<O>>;`,
    `type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : { extra_in_ts: Exclude<A, B> }) : { missing_in_ts: Exclude<B, A> };`,
  ];
  for (const [schema, type] of Object.entries(SCHEMA_TYPES)) {
    const s = schemas[schema];
    assert.ok(s?.properties, `schema ${schema} has properties`);
    const props = Object.keys(s.properties);
    const required = s.required ?? [];
    const optional = props.filter((p) => !required.includes(p));
    const id = schema;
    lines.push(
      `const ${id}_missing_in_ts: None<Exclude<${union(props)}, keyof T.${type}>> = true;`,
      `const ${id}_not_in_schema: None<Exclude<keyof T.${type}, ${union(props)}>> = true;`,
      `const ${id}_required_but_optional_in_ts: None<Exclude<${union(required)}, RequiredKeys<T.${type}>>> = true;`,
      `const ${id}_optional_but_required_in_ts: None<Exclude<${union(optional)}, OptionalKeys<T.${type}>>> = true;`,
    );
  }
  for (const [schema, type] of Object.entries(ENUM_TYPES)) {
    lines.push(`const ${schema}_enum: Same<T.${type}, ${union(schemas[schema].enum)}> = true;`);
  }
  return lines.join("\n") + "\n";
}

function diagnostics(source) {
  const file = path.join(here, "__openapi_check__.ts");
  const options = {
    strict: true,
    noEmit: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    lib: ["lib.es2022.d.ts"],
    types: [],
    noUnusedLocals: false,
  };
  const host = ts.createCompilerHost(options);
  const read = host.readFile.bind(host);
  host.readFile = (name) => (path.resolve(name) === file ? source : read(name));
  const exists = host.fileExists.bind(host);
  host.fileExists = (name) => path.resolve(name) === file || exists(name);
  const program = ts.createProgram([file], options, host);
  return ts.getPreEmitDiagnostics(program).map((d) => {
    const text = ts.flattenDiagnosticMessageText(d.messageText, "\n");
    if (!d.file) return text;
    const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
    return `${d.file.fileName === file ? source.split("\n")[line] : d.file.fileName}\n  ${text}`;
  });
}

test("src/types.ts has exactly the properties of the OpenAPI schemas", () => {
  const problems = diagnostics(assertion());
  assert.deepEqual(problems, [], problems.join("\n\n"));
});

test("the check catches a property the TS types lack", () => {
  const source = assertion().replace(
    `import type * as T from "../src/types.js";`,
    `import type * as U from "../src/types.js";\n` +
      `declare namespace T { type Batch = Omit<U.Batch, "version">; type Submission = U.Submission & { surplus?: 1 }; ` +
      Object.values({ ...SCHEMA_TYPES, ...ENUM_TYPES })
        .filter((t) => t !== "Batch" && t !== "Submission")
        .map((t) => `type ${t} = U.${t};`)
        .join(" ") +
      ` }`,
  );
  const problems = diagnostics(source).join("\n");
  assert.match(problems, /Batch_missing_in_ts[\s\S]*"version"/);
  assert.match(problems, /Submission_not_in_schema[\s\S]*"surplus"/);
});
