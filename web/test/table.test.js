// A table inside the graph's data (`table_in_graph`) reads back as the Python runtime reads it, bit for bit: float16
// and float32 scales, and a factor applied after the scales (a GGUF lm_head whose table is its rows times sqrt(width)).

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "node:test";

import { openTable } from "../src/table.js";
import { PYTHON } from "./helpers.js";

const VOCAB = 7;
const WIDTH = 64;

/** Rows as numpy's ScaledRows gives them for the same codes, scales, zero point and factor. */
function pythonRows(codes, scales, zeroPoint, factor) {
  const script = `
import json, sys
import numpy as np
from softprompt.formats.embedding_table import ScaledRows
r = json.load(sys.stdin)
codes = np.array(r["codes"], np.uint8).reshape(${VOCAB}, ${WIDTH})
scales = np.array(r["scales"], np.float32).reshape(${VOCAB}, -1)
rows = ScaledRows(codes, scales, r["zero_point"], r["factor"])[np.arange(${VOCAB})]
print(json.dumps([float(v) for v in rows.reshape(-1)]))
`;
  const done = spawnSync(PYTHON, ["-c", script], {
    input: JSON.stringify({ codes: Array.from(codes), scales: Array.from(scales), zero_point: zeroPoint, factor }),
    encoding: "utf-8",
  });
  if (done.status !== 0) throw new Error(`the Python reference failed:\n${done.stderr}`);
  return JSON.parse(done.stdout);
}

for (const factor of [1, Math.fround(Math.sqrt(640)), Math.fround(Math.sqrt(160))]) {
  test(`rows of a table inside the graph's data, factor ${factor}, equal numpy's`, async () => {
    const codes = new Uint8Array(VOCAB * WIDTH);
    const scales = new Float32Array(VOCAB * (WIDTH / 32));
    let seed = 12345;
    const next = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
    for (let i = 0; i < codes.length; i++) codes[i] = Math.floor(next() * 256);
    for (let i = 0; i < scales.length; i++) scales[i] = Math.fround(1e-3 + next() * 0.05);
    const data = new ArrayBuffer(codes.byteLength + scales.byteLength);
    new Uint8Array(data).set(codes);
    new Uint8Array(data, codes.byteLength).set(new Uint8Array(scales.buffer));
    const config = {
      vocab_size: VOCAB,
      hidden_size: WIDTH,
      files: { embeddings: "model.onnx.data" },
      table_in_graph: { codes_offset: 0, scales_offset: codes.byteLength, zero_point: 128, ...(factor === 1 ? {} : { factor }) },
    };
    const table = await openTable(null, config, { "model.onnx.data": data });
    const got = new Float32Array(VOCAB * WIDTH);
    for (let id = 0; id < VOCAB; id++) table.row(id, got, id * WIDTH);
    const want = pythonRows(codes, scales, 128, factor);
    const differ = want.findIndex((value, i) => value !== got[i]);
    assert.equal(differ, -1, `row value ${differ}: ${got[differ]} here, ${want[differ]} in Python`);
  });
}
