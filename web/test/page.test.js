// The page in a real headless Chromium (Debian's, driven by Playwright): it loads the default int4 export
// ($SOFTPROMPT_INT4_EXPORT, which make test-web exports), classifies and generates what the Python runtime gives, and serves a task replaced in the bank after a
// reload; with $SOFTPROMPT_WEB_EXPORT, a second export picked in the page generates what Python gives on it.
// Screenshots are kept in web/test-results/.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { cp, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { startServer } from "../serve.js";
import { HERE, ROOT, pythonReference } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM ?? ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);
const INT4 = process.env.SOFTPROMPT_INT4_EXPORT;
const EXPORT = INT4;
const PAGE_EXPORT = process.env.SOFTPROMPT_WEB_EXPORT; // export-model --web: a second export to pick in the page
const SHIPPED = path.join(ROOT, "banks/smollm2-135m");
const [CLASSIFY_TASK, GENERATE_TASK, REPLACEMENT] = ["sentiment", "define", "sentiment-ptuning"];

let server;
let browser;
let bank;

before(async () => {
  if (!INT4) return;
  assert.ok(CHROMIUM, "no chromium: apt-get install chromium (make test-web does), or set CHROMIUM");
  bank = await mkdtemp(path.join(os.tmpdir(), "softprompt-page-"));
  for (const name of await readdir(SHIPPED)) await cp(path.join(SHIPPED, name), path.join(bank, name));
  server = await startServer({ exportDirs: [EXPORT, ...(PAGE_EXPORT ? [PAGE_EXPORT] : [])], bankDir: bank, port: 0 });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  server?.close();
});

async function openPage() {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(error.message));
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => window.softprompt?.ready, null, { timeout: 120_000 });
  const failed = await page.evaluate(() => window.softprompt.error ?? null);
  assert.equal(failed, null, `the page did not load the export: ${failed} ${errors}`);
  return page;
}

async function generate(page) {
  await page.evaluate(() => delete document.getElementById("output").dataset.done);
  await page.click("#generate");
  await page.waitForSelector("#output[data-done=yes]", { timeout: 120_000 });
}

async function classify(page, task, text) {
  await page.selectOption("#task", task);
  await page.fill("#input", text);
  await page.evaluate(() => delete document.getElementById("scores").dataset.label);
  await page.click("#classify");
  await page.waitForFunction(() => document.getElementById("scores").dataset.label || document.getElementById("error").textContent);
  assert.equal(await page.textContent("#error"), "");
  const [first, ...lines] = (await page.textContent("#scores")).split("\n");
  return { label: first.replace("label: ", ""), scores: Object.fromEntries(lines.map((l) => l.split(": ")).map(([k, v]) => [k, Number(v)])) };
}

/** The page's result is the Python runtime's: its label, and its scores within what WebAssembly's int8-activation
 * kernels change (onnxruntime-node gives them to 1e-5; the browser's kernels quantize activations otherwise). */
function same(got, want, where) {
  assert.equal(got.label, want.label, where);
  for (const [label, p] of Object.entries(want.scores)) assert.ok(Math.abs(got.scores[label] - p) < 0.01, `${where}: ${label} ${got.scores[label]} vs ${p}`);
}

const skip = INT4 ? false : "set SOFTPROMPT_INT4_EXPORT to the default int4 export (make test-web does)";

test("the page classifies and generates what the Python runtime gives, and serves a replaced task after a reload", { timeout: 300_000, skip }, async () => {
  const texts = ["What a waste of two hours.", "A gorgeous, moving film."];
  const word = "Committee, n.";
  const cases = [
    ...texts.map((text) => ({ op: "classify", text, task: CLASSIFY_TASK })),
    { op: "generate", text: word, task: GENERATE_TASK, settings: { max_new_tokens: 16 } },
  ];
  const want = pythonReference({ export: EXPORT, bank, cases });
  const page = await openPage();
  assert.match(await page.textContent("#status"), /loaded in .* s; \d+ tasks; 2 threads/);
  for (const [i, text] of texts.entries()) same(await classify(page, CLASSIFY_TASK, text), want[i], text);

  await page.selectOption("#task", GENERATE_TASK);
  await page.fill("#input", word);
  await page.fill("#tokens", "16");
  await generate(page);
  assert.equal(await page.textContent("#output"), want[2].text);
  assert.match(await page.textContent("#speed"), /first token [\d.]+ s, [\d.]+ tokens\/s/);
  await mkdir(path.join(HERE, "../test-results"), { recursive: true });
  await page.screenshot({ path: path.join(HERE, "../test-results/page.png"), fullPage: true });

  // Replace the classification task with another one's record and vectors, as `prompt-bank` would, and reload.
  for (const name of await readdir(bank)) if (name.startsWith(`${CLASSIFY_TASK}.`)) await rm(path.join(bank, name));
  const replaced = (await readdir(SHIPPED)).filter((n) => n.startsWith(`${REPLACEMENT}.`));
  for (const name of replaced) await cp(path.join(SHIPPED, name), path.join(bank, name.replace(REPLACEMENT, CLASSIFY_TASK)));
  const record = JSON.parse(await readFile(path.join(bank, `${CLASSIFY_TASK}.json`), "utf-8"));
  record.name = CLASSIFY_TASK;
  if (record.vectors) record.vectors = record.vectors.replace(REPLACEMENT, CLASSIFY_TASK);
  await writeFile(path.join(bank, `${CLASSIFY_TASK}.json`), JSON.stringify(record));
  const newer = pythonReference({ export: EXPORT, bank, cases: texts.map((text) => ({ op: "classify", text, task: CLASSIFY_TASK })) });
  await page.reload();
  await page.waitForFunction(() => window.softprompt?.ready, null, { timeout: 120_000 });
  const moved = Math.max(...texts.map((_, i) => Math.abs(newer[i].scores.positive - want[i].scores.positive)));
  assert.ok(moved > 0.05, `the replacement scores as the old task did (${moved}); the test would not see a reload`);
  for (const [i, text] of texts.entries()) same(await classify(page, CLASSIFY_TASK, text), newer[i], `${text} (replaced)`);

  if (PAGE_EXPORT) { // another export picked in the page: loaded, and generating what Python gives on it
    const name = path.basename(PAGE_EXPORT);
    const [expected] = pythonReference({ export: PAGE_EXPORT, bank, cases: [cases[2]] });
    await page.selectOption("#export", name);
    await page.waitForFunction((n) => window.softprompt?.ready && window.softprompt.export === n, name, { timeout: 120_000 });
    await page.selectOption("#task", GENERATE_TASK);
    await page.fill("#input", word);
    await generate(page);
    assert.equal(await page.textContent("#output"), expected.text);
    await page.screenshot({ path: path.join(HERE, "../test-results/page-web-export.png"), fullPage: true });
  }
  await page.close();
});
