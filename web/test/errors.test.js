// Errors a user can act on, each one clear message, nothing half-loaded; and a task replaced in the bank is served
// after `reload()` while a broken replacement leaves the old version serving.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cp, mkdtemp, readFile, rename, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { before, describe, test } from "node:test";

import * as ort from "onnxruntime-node";

import { ExportFormatError, PromptBankError, RequestError, UnknownTaskError, checkOnnxruntime, folderReader, load } from "../src/index.js";
import { FIXTURE } from "./helpers.js";

const EXPORT = path.join(FIXTURE, "export");

/** A schema 2 copy of the fixture's `sentiment` task (vectors under their hash), named `name`, in `bank`. */
async function schema2(bank, name, vectorsFrom = "sentiment") {
  const bytes = await readFile(path.join(FIXTURE, "bank", `${vectorsFrom}.npy`));
  const digest = createHash("sha256").update(bytes).digest("hex");
  const file = `${name}.${digest.slice(0, 16)}.npy`;
  await writeFile(path.join(bank, file), bytes);
  const record = JSON.parse(await readFile(path.join(FIXTURE, "bank", `${vectorsFrom}.json`), "utf-8"));
  Object.assign(record, { schema_version: 2, name, vectors: file, vectors_sha256: digest });
  await writeFile(path.join(bank, `.${name}.json.tmp`), JSON.stringify(record));
  await rename(path.join(bank, `.${name}.json.tmp`), path.join(bank, `${name}.json`)); // the record last, as a write does
  return { file, record };
}

async function open(bank, options = {}) {
  return load(await folderReader(EXPORT), { ort, bank: await folderReader(bank), ...options });
}

describe("refusals", () => {
  let bank;
  before(async () => {
    bank = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
    await cp(path.join(FIXTURE, "bank"), bank, { recursive: true });
  });

  test("an export whose attention needs onnxruntime 1.32 says so, and what to export instead", async () => {
    const other = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
    await cp(EXPORT, other, { recursive: true });
    const config = JSON.parse(await readFile(path.join(other, "softprompt.json"), "utf-8"));
    await writeFile(path.join(other, "softprompt.json"), JSON.stringify({ ...config, kv_cache: "shared" }));
    await assert.rejects(load(await folderReader(other), { ort }), (error) => {
      assert.ok(error instanceof ExportFormatError);
      assert.match(error.message, /needs onnxruntime 1\.32 or later; this is onnxruntime 1\.31\.1: export the model for pages with --web, or with --kv-cache growing/);
      return true;
    });
    checkOnnxruntime({ kv_cache: "shared" }, "1.32.0");
    checkOnnxruntime({ kv_cache: "shared" }, "2.0.0");
    checkOnnxruntime({ kv_cache: "growing" }, "1.20.0");
    checkOnnxruntime({}, "1.20.0");
    assert.throws(() => checkOnnxruntime({ kv_cache: "shared" }, "1.9.0"), ExportFormatError);
  });

  test("an unknown task names the tasks there are", async () => {
    const model = await open(bank);
    await assert.rejects(model.generate("x", { task: "sentimnet" }), (error) => {
      assert.ok(error instanceof UnknownTaskError);
      assert.match(error.message, /unknown task "sentimnet"; the bank has "sentiment", "short", "story"/);
      return true;
    });
    await assert.rejects(open(bank, { tasks: ["sentiment", "missing"] }), /task "missing": .*missing\.json does not exist/);
  });

  test("vectors that do not match their record's hash are refused, and nothing is loaded", async () => {
    const other = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
    const { file } = await schema2(other, "good");
    await schema2(other, "bad");
    const bytes = await readFile(path.join(other, file));
    bytes[bytes.length - 1] ^= 1;
    const badFile = JSON.parse(await readFile(path.join(other, "bad.json"), "utf-8")).vectors;
    await writeFile(path.join(other, badFile), bytes);
    await assert.rejects(open(other), (error) => {
      assert.ok(error instanceof PromptBankError);
      assert.match(error.message, /bad\.[0-9a-f]{16}\.npy: sha256 [0-9a-f]{16}\.\.\. is not the record's/);
      return true;
    });
    assert.deepEqual((await open(other, { tasks: ["good"] })).tasks, ["good"]);
  });

  test("a bank made for another backbone is refused by its fingerprint", async () => {
    const other = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
    await schema2(other, "foreign");
    const record = JSON.parse(await readFile(path.join(other, "foreign.json"), "utf-8"));
    record.fingerprint = "sha256:" + "ab".repeat(32);
    await writeFile(path.join(other, "foreign.json"), JSON.stringify(record));
    await assert.rejects(open(other), /foreign\.json: made for backbone abababababab; this model is aa1b395959ec/);
  });

  test("a file that is not .npy, and a record naming a file outside its task, are refused", async () => {
    const other = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
    await cp(path.join(FIXTURE, "bank", "short.json"), path.join(other, "short.json"));
    await writeFile(path.join(other, "short.npy"), "not an array");
    await assert.rejects(open(other), /short\.npy: not a \.npy file/);
    const { record } = await schema2(other, "escape");
    record.vectors = "../escape.0123456789abcdef.npy";
    await writeFile(path.join(other, "escape.json"), JSON.stringify(record));
    await assert.rejects(open(other, { tasks: ["escape"] }), /vectors "\.\.\/escape\.0123456789abcdef\.npy"; expected escape\.<hash>\.npy in the bank/);
  });

  test("an export too large for the page's memory is refused before onnxruntime sees it", async () => {
    await assert.rejects(load(await folderReader(EXPORT), { ort, maxBytes: 1000 }), (error) => {
      assert.ok(error instanceof ExportFormatError);
      assert.match(error.message, /the export's graph is 0 MiB; this page can hold 0 MiB: export a smaller precision/);
      return true;
    });
    await assert.rejects(load(await folderReader(path.join(FIXTURE, "bank")), { ort }), /softprompt\.json: missing; not an export folder/);
  });

  test("requests the model cannot serve", async () => {
    const model = await open(bank);
    const empty = model.steps([], null);
    await assert.rejects(empty.next(), (error) => error instanceof RequestError && /nothing to continue from/.test(error.message));
    await assert.rejects(model.generate("x", { maxNewTokens: 500 }), /needs 0 prompt \+ 2 input \+ 500 new = 502 positions; the model has 128/);
    await assert.rejects(model.generate("x", { temperature: -1 }), /temperature -1; expected 0 \(greedy\)/);
    await assert.rejects(model.generate("x", { max_new_tokens: 3 }), /unknown generation settings max_new_tokens/);
    await assert.rejects(model.classify("x", "story"), /task "story" has no labels/);
    assert.throws(() => model.renderChat([{ role: "user", content: "hi" }]), /has no chat template/);
  });
});

test("a task replaced in the bank is served after reload; a broken replacement keeps the old one serving", async () => {
  const bank = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
  await schema2(bank, "t", "sentiment");
  const model = await open(bank);
  const before = (await model.generate("a gorgeous film", { task: "t", maxNewTokens: 6 })).tokenIds;
  await schema2(bank, "t", "story"); // a new version: other vectors, other template
  assert.deepEqual(await model.reload(), {});
  const after = (await model.generate("a gorgeous film", { task: "t", maxNewTokens: 6 })).tokenIds;
  const fresh = await open(bank);
  assert.deepEqual(after, (await fresh.generate("a gorgeous film", { task: "t", maxNewTokens: 6 })).tokenIds);
  assert.notDeepEqual(after, before);
  const record = JSON.parse(await readFile(path.join(bank, "t.json"), "utf-8"));
  record.vectors_sha256 = "0".repeat(64);
  await writeFile(path.join(bank, "t.json"), JSON.stringify(record));
  const failed = await model.reload();
  assert.match(failed.t.message, /is not the record's/);
  assert.deepEqual((await model.generate("a gorgeous film", { task: "t", maxNewTokens: 6 })).tokenIds, after);
});
