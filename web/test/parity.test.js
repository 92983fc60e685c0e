// The same export, bank, text and task give the Python runtime's tokens, text and scores: on the committed fixture
// (plus a bank of every task kind the Python side writes), and on the default int4 export when one is given
// ($SOFTPROMPT_INT4_EXPORT, which `make test` exports).

import assert from "node:assert/strict";
import { cp, mkdtemp } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { before, describe, test } from "node:test";

import * as ort from "onnxruntime-node";

import { folderReader, load } from "../src/index.js";
import { FIXTURE, pythonReference } from "./helpers.js";

const TEXTS = ["a gorgeous, moving film", "dull, slow and far too long", "the quick brown fox", ""];

function cases(tasks, texts = TEXTS) {
  const out = [];
  for (const task of [null, ...tasks]) {
    for (const text of texts) {
      out.push({ op: "generate", text, task, settings: { max_new_tokens: 12 } });
      out.push({ op: "generate", text, task, settings: { max_new_tokens: 10, temperature: 0.9, seed: 11, top_k: 40, top_p: 0.9 } });
    }
  }
  out.push({ op: "generate", text: TEXTS[0], task: null, settings: { max_new_tokens: 12, min_new_tokens: 12, stop: [" S"] } });
  return out;
}

function camel(settings) {
  const names = { max_new_tokens: "maxNewTokens", min_new_tokens: "minNewTokens", top_k: "topK", top_p: "topP" };
  return Object.fromEntries(Object.entries(settings).map(([k, v]) => [names[k] ?? k, v]));
}

async function compare(model, list, want) {
  for (const [i, c] of list.entries()) {
    const where = `${c.op} ${JSON.stringify(c.text)} under ${c.task} with ${JSON.stringify(c.settings ?? {})}`;
    if (c.op === "chat") {
      assert.equal(model.renderChat(c.messages, c.task), want[i].rendered, where);
      const got = await model.chat(c.messages, { task: c.task, ...camel(c.settings ?? {}) });
      assert.deepEqual(got.tokenIds, want[i].ids, where);
      assert.equal(got.text, want[i].text, where);
      continue;
    }
    if (c.op === "classify") {
      const got = await model.classify(c.text, c.task);
      assert.equal(got.label, want[i].label, where);
      for (const [label, p] of Object.entries(want[i].scores)) assert.ok(Math.abs(got.scores[label] - p) < 1e-5, `${where}: ${label}`);
      continue;
    }
    const options = { task: c.task, ...camel(c.settings) };
    const got = await model.generate(c.text, options);
    assert.deepEqual(got.tokenIds, want[i].ids, where);
    assert.equal(got.text, want[i].text, where);
    assert.equal(got.finishReason, want[i].finish, where);
    let streamed = "";
    for await (const piece of model.stream(c.text, options)) streamed += piece;
    assert.equal(streamed, want[i].stream, `${where}: streamed`);
  }
}

describe("the committed fixture", () => {
  let bank;
  let model;
  let list;
  let want;

  before(async () => {
    bank = await mkdtemp(path.join(os.tmpdir(), "softprompt-web-"));
    await cp(path.join(FIXTURE, "bank"), bank, { recursive: true });
    const tasks = ["sentiment", "short", "story", "half", "pattern", "prefix"];
    list = [
      ...cases(tasks),
      ...["sentiment", "half"].flatMap((task) => TEXTS.slice(0, 3).map((text) => ({ op: "classify", text, task }))),
    ].filter((c) => !(c.op === "generate" && c.text === "" && c.task === "prefix")); // a prefix needs a token
    want = pythonReference({ export: path.join(FIXTURE, "export"), bank, make_bank: true, cases: list });
    model = await load(await folderReader(path.join(FIXTURE, "export")), { ort, bank: await folderReader(bank) });
  });

  test("serves every task of the bank", () => {
    assert.deepEqual(model.tasks, ["half", "pattern", "prefix", "sentiment", "short", "story"]);
  });

  test("greedy and seeded tokens, texts, streams and scores equal the Python runtime's", async () => {
    await compare(model, list, want);
  });
});

describe("the default int4 export", { skip: process.env.SOFTPROMPT_INT4_EXPORT ? false : "set SOFTPROMPT_INT4_EXPORT (make test-web does)" }, () => {
  test("gives the Python runtime's greedy tokens and the shipped tasks' labels", async () => {
    const exportDir = process.env.SOFTPROMPT_INT4_EXPORT;
    const bank = process.env.SOFTPROMPT_BANK ?? path.resolve(FIXTURE, "../../banks/smollm2-135m");
    const texts = ["Committee, n.", "What a waste of two hours.", "The capital of France is"];
    const list = [
      ...texts.map((text) => ({ op: "generate", text, task: null, settings: { max_new_tokens: 16 } })),
      { op: "generate", text: "Committee, n.", task: "define", settings: { max_new_tokens: 24 } },
      { op: "chat", messages: [{ role: "user", content: "What is the capital of France?" }], task: null, settings: { max_new_tokens: 16 } },
      { op: "classify", text: "What a waste of two hours.", task: "sentiment" },
      { op: "classify", text: "A gorgeous, moving film.", task: "sentiment" },
      { op: "classify", text: "A gorgeous, moving film.", task: "sentiment-prefix" },
      { op: "classify", text: "What a waste of two hours.", task: "sentiment-ptuning" },
    ];
    const want = pythonReference({ export: exportDir, bank, cases: list });
    const model = await load(await folderReader(exportDir), { ort, bank: await folderReader(bank), tasks: ["define", "sentiment", "sentiment-prefix", "sentiment-ptuning"] });
    await compare(model, list, want);
  });
});

describe("an int4 export for pages (export-model --web) on onnxruntime-web's WebAssembly", {
  skip: process.env.SOFTPROMPT_WEB_EXPORT ? false : "set SOFTPROMPT_WEB_EXPORT (make test-web does)",
}, () => {
  test("gives the Python runtime's greedy tokens on the same export", async () => {
    const wasm = await import("onnxruntime-web");
    wasm.env.wasm.numThreads = 2;
    const exportDir = process.env.SOFTPROMPT_WEB_EXPORT;
    const bank = path.resolve(FIXTURE, "../../banks/smollm2-135m");
    const list = [
      ...["Committee, n.", "The capital of France is"].map((text) => ({ op: "generate", text, task: null, settings: { max_new_tokens: 16 } })),
      { op: "generate", text: "Committee, n.", task: "define", settings: { max_new_tokens: 24 } },
      { op: "classify", text: "What a waste of two hours.", task: "sentiment" },
    ];
    const want = pythonReference({ export: exportDir, bank, cases: list });
    const model = await load(await folderReader(exportDir), {
      ort: wasm, bank: await folderReader(bank), tasks: ["define", "sentiment"], sessionOptions: { executionProviders: ["wasm"] },
    });
    await compare(model, list, want);
  });
});
