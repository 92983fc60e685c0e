// NumPy's .npy format (version 1-3), read without pickles: what FORMAT.md's tables and vectors files are.

import { PromptBankError } from "./errors.js";

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
const DTYPES = { "<f4": "float32", "<f2": "float16", "|i1": "int8", "<i1": "int8", "|u1": "uint8" };

/**
 * Parse an .npy file: `{dtype, shape, data}` with `data` a typed array over the file's bytes (float16 comes back as
 * a Uint16Array of raw halves; `toFloat32` converts). `where` names the file in errors.
 */
export function parseNpy(buffer, where = "array", Error = PromptBankError) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) {
    throw new Error(`${where}: not a .npy file (it does not start with \\x93NUMPY)`);
  }
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  if (start + headerLength > bytes.length) throw new Error(`${where}: the .npy header is cut short`);
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new Error(`${where}: a .npy header without descr, fortran_order and shape`);
  }
  const dtype = DTYPES[descr];
  if (!dtype) throw new Error(`${where}: dtype ${descr}; expected float32, float16 or int8 (never pickled objects)`);
  if (fortran === "True") throw new Error(`${where}: a Fortran-ordered array; save it C-ordered`);
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLength;
  const itemSize = { float32: 4, float16: 2, int8: 1, uint8: 1 }[dtype];
  if (bytes.length - offset !== count * itemSize) {
    throw new Error(`${where}: shape [${shape}] needs ${count * itemSize} bytes of data; the file has ${bytes.length - offset}`);
  }
  const body = bytes.slice(offset).buffer; // aligned for the typed array
  const Kind = { float32: Float32Array, float16: Uint16Array, int8: Int8Array, uint8: Uint8Array }[dtype];
  return { dtype, shape, data: new Kind(body) };
}

/** IEEE half-precision bits to float32, exactly (numpy's astype(float32)). */
export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** The array's values as float32, whatever it was stored in. */
export function toFloat32(array) {
  if (array.dtype === "float32") return array.data;
  const out = new Float32Array(array.data.length);
  if (array.dtype === "float16") for (let i = 0; i < out.length; i++) out[i] = halfToFloat(array.data[i]);
  else out.set(array.data);
  return out;
}
