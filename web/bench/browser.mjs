// Decode in Chromium (WebAssembly, 2 threads): softprompt-web on an export against wllama (llama.cpp in WebAssembly)
// on a GGUF, in one run, alternating; medians, ratio, bytes downloaded before the first token, and the machine.
//   node bench/browser.mjs --export EXPORT_DIR --gguf FILE.gguf [--tokens 32] [--rounds 3] [--threads 2]

import { existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

import { startServer } from "../serve.js";

const { values } = parseArgs({
  options: {
    export: { type: "string" }, gguf: { type: "string" },
    tokens: { type: "string", default: "32" }, rounds: { type: "string", default: "3" }, threads: { type: "string", default: "2" },
  },
});
if (!values.export || !values.gguf) {
  console.error("usage: node bench/browser.mjs --export EXPORT_DIR --gguf FILE.gguf [--tokens 32] [--rounds 3] [--threads 2]");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM ?? ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);
const server = await startServer({ exportDir: values.export, port: 0, more: { "/gguf/": path.dirname(path.resolve(values.gguf)) } });
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const page = await browser.newPage();
page.on("pageerror", (error) => console.error("page:", error.message));
await page.goto(`http://127.0.0.1:${server.address().port}/bench/page.html?threads=${values.threads}`);
await page.waitForFunction(() => window.ready);
const loaded = { ours: await page.evaluate(() => window.loadOurs()) };
loaded.wllama = await page.evaluate((url) => window.loadWllama(url), `/gguf/${path.basename(values.gguf)}`);
const text = "Committee, n.";
const tokens = Number(values.tokens);
const runs = { ours: [], wllama: [] };
for (let round = 0; round <= Number(values.rounds); round++) {
  for (const side of ["ours", "wllama"]) {
    const result = await page.evaluate(([fn, t, n]) => window[fn](t, n), [side === "ours" ? "runOurs" : "runWllama", text, tokens]);
    if (round > 0) runs[side].push(result); // round 0 warms up
  }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`Chromium ${browser.version()}, ${os.cpus()[0].model}, ${os.cpus().length} cores, ${values.threads} threads, ${tokens} new tokens, medians of ${values.rounds}`);
for (const side of ["ours", "wllama"]) {
  const rate = median(runs[side].map((r) => r.perSecond));
  const first = median(runs[side].map((r) => r.first));
  console.log(
    `  ${side === "ours" ? `softprompt-web ${path.basename(values.export)}` : `wllama ${path.basename(values.gguf)}`}: ` +
      `${rate.toFixed(1)} tokens/s, first token ${first.toFixed(0)} ms, loaded in ${loaded[side].seconds.toFixed(1)} s, ` +
      `${(loaded[side].bytes / 1e6).toFixed(1)} MB downloaded before the first token`,
  );
}
const ratio = median(runs.ours.map((r) => r.perSecond)) / median(runs.wllama.map((r) => r.perSecond));
console.log(`  softprompt-web / wllama: ${ratio.toFixed(2)}x`);
await browser.close();
server.close();
