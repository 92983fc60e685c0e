// The embedding table at each precision FORMAT.md defines: float32, float16, int8 with a scale per block of a row,
// or a tied lm_head's 8-bit weights inside the graph's data (`table_in_graph`). Rows come back float32.

import { ExportFormatError } from "./errors.js";
import { halfToFloat, parseNpy, toFloat32 } from "./npy.js";

const BLOCK = 32;

export class EmbeddingTable {
  /** `factor`: what the rows are multiplied by after their scales (`table_in_graph.factor`: Gemma's sqrt(width)). */
  constructor(vocab, width, codes, scales = null, zeroPoint = 0, factor = 1) {
    Object.assign(this, { vocab, width, codes, scales, zeroPoint, factor });
    this.blocks = scales ? scales.length / vocab : 0;
  }

  /** Row `id` written into `out` at `offset` (float32, rounded as numpy's float32 products are: one rounding each). */
  row(id, out, offset = 0) {
    const { width, codes, scales, zeroPoint, factor } = this;
    const start = id * width;
    if (!scales) {
      for (let j = 0; j < width; j++) out[offset + j] = codes[start + j];
      return;
    }
    const block = width / this.blocks;
    for (let j = 0; j < width; j++) {
      const value = (codes[start + j] - zeroPoint) * scales[id * this.blocks + Math.floor(j / block)];
      out[offset + j] = factor === 1 ? value : Math.fround(value) * factor;
    }
  }
}

/** The export's table, checked against softprompt.json's vocab_size and hidden_size. */
export async function openTable(reader, config, graphData) {
  const vocab = config.vocab_size;
  const width = config.hidden_size;
  const name = config.files.embeddings;
  if (config.table_in_graph) {
    const { codes_offset: codesAt, scales_offset: scalesAt, zero_point: zeroPoint, factor = 1 } = config.table_in_graph;
    const half = config.table_in_graph.scales_dtype === "float16";
    const data = graphData?.[name];
    if (!data) throw new ExportFormatError(`${name}: the table is inside the graph's data, which the export does not have`);
    const scalesLength = vocab * (width / BLOCK) * (half ? 2 : 4);
    if (width % BLOCK || codesAt + vocab * width > data.byteLength || scalesAt + scalesLength > data.byteLength) {
      throw new ExportFormatError(`${name}: table_in_graph does not fit in its ${data.byteLength} bytes; the file is not the export's`);
    }
    const codes = new Uint8Array(data, codesAt, vocab * width);
    const scales = half
      ? Float32Array.from(new Uint16Array(data.slice(scalesAt, scalesAt + scalesLength)), halfToFloat)
      : new Float32Array(data.slice(scalesAt, scalesAt + scalesLength));
    return new EmbeddingTable(vocab, width, codes, scales, zeroPoint, factor);
  }
  const bytes = await reader.read(name);
  if (bytes === null) throw new ExportFormatError(`${name}: missing from the export`);
  const array = parseNpy(bytes, name, ExportFormatError);
  if (array.shape.length !== 2 || array.shape[0] !== vocab || array.shape[1] !== width) {
    throw new ExportFormatError(`${name}: shape [${array.shape}]; softprompt.json expects [${vocab}, ${width}]`);
  }
  if (array.dtype !== "int8") return new EmbeddingTable(vocab, width, toFloat32(array));
  const scalesName = config.files.embedding_scales;
  const scalesBytes = scalesName ? await reader.read(scalesName) : null;
  if (scalesBytes === null) throw new ExportFormatError(`${name}: int8 rows need their scales (files.embedding_scales)`);
  const scales = parseNpy(scalesBytes, scalesName, ExportFormatError);
  if (scales.dtype !== "float32" || scales.shape.length !== 2 || scales.shape[0] !== vocab || width % scales.shape[1]) {
    throw new ExportFormatError(`${scalesName}: ${scales.dtype} [${scales.shape}]; expected float32 [${vocab}, blocks]`);
  }
  return new EmbeddingTable(vocab, width, array.data, scales.data);
}
