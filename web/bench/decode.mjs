// Decode speed of the same export through this library on onnxruntime-node (native, what the Python runtime runs
// on) and on onnxruntime-web's WebAssembly backend (what a page runs), in one run, alternating; medians and ratio.
//   node bench/decode.mjs EXPORT_DIR [--tokens 32] [--rounds 3] [--threads 2]

import os from "node:os";
import { parseArgs } from "node:util";

import { folderReader, load } from "../src/index.js";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { tokens: { type: "string", default: "32" }, rounds: { type: "string", default: "3" }, threads: { type: "string", default: "2" } },
});
const [exportDir] = positionals;
const threads = Number(values.threads);
const sides = {};
for (const side of ["node", "wasm"]) {
  const ort = side === "wasm" ? await import("onnxruntime-web") : await import("onnxruntime-node");
  if (side === "wasm") ort.env.wasm.numThreads = threads;
  const sessionOptions = side === "wasm" ? { executionProviders: ["wasm"] } : { intraOpNumThreads: threads };
  sides[side] = { model: await load(await folderReader(exportDir), { ort, sessionOptions }), rates: [], firsts: [] };
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
for (let round = 0; round < Number(values.rounds) + 1; round++) {
  for (const [side, s] of Object.entries(sides)) {
    const started = performance.now();
    let first = 0;
    let count = 0;
    const tokens = Number(values.tokens);
    for await (const state of s.model.steps(s.model.encode("Committee, n."), null, { maxNewTokens: tokens, minNewTokens: tokens })) {
      first ||= performance.now();
      count = state.ids.length;
    }
    if (round === 0) continue; // warm-up
    s.rates.push((count - 1) / ((performance.now() - first) / 1000));
    s.firsts.push(first - started);
  }
}
console.log(`${exportDir}: ${os.cpus()[0].model}, ${os.cpus().length} cores, ${threads} threads, node ${process.version}`);
for (const [side, s] of Object.entries(sides)) {
  console.log(`  ${side.padEnd(5)} ${median(s.rates).toFixed(1)} tokens/s, first token ${median(s.firsts).toFixed(0)} ms (medians of ${s.rates.length})`);
}
console.log(`  wasm / node: ${(median(sides.wasm.rates) / median(sides.node.rates)).toFixed(3)}x`);
