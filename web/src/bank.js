// A prompt bank's tasks, read as FORMAT.md defines them: schema 1 and 2 records, float32/float16 vectors, prompt,
// P-tuning and prefix tasks; vectors checked against their sha256 (WebCrypto) and against the export.

import { PromptBankError, UnknownTaskError } from "./errors.js";
import { readJson } from "./files.js";
import { parseNpy, toFloat32 } from "./npy.js";
import { TaskSpec } from "./template.js";

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

async function sha256Hex(buffer) {
  const digest = await globalThis.crypto.subtle.digest("SHA-256", buffer);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function short(fingerprint) {
  return String(fingerprint).replace("sha256:", "").slice(0, 12);
}

/**
 * Task `name` of the bank: `{name, spec, rows, vectors, inner, innerRows, past}` (`vectors` the [rows, E] float32
 * prompt before the input, `inner` a pattern's vectors after it, `past` a prefix task's keys and values, one
 * [kv_heads * P * head_size] array per cache input). `model` is the export's config.
 */
export async function readTask(reader, name, model) {
  if (typeof name !== "string" || !NAME.test(name)) {
    throw new PromptBankError(`task name ${JSON.stringify(name)}; expected letters, digits, _, - and ., starting with a letter or digit`);
  }
  const where = `${reader.where ?? ""}${name}.json`;
  const record = await readJson(reader, `${name}.json`, PromptBankError);
  if (record === null) throw new UnknownTaskError(`task ${JSON.stringify(name)}: ${where} does not exist`);
  const version = record.schema_version ?? 1;
  if (![1, 2].includes(version)) throw new PromptBankError(`${where}: schema_version ${version}; this reader reads 1, 2`);
  if (record.name !== name) throw new PromptBankError(`${where}: names task ${JSON.stringify(record.name)}; expected ${JSON.stringify(name)}`);
  if (record.fingerprint !== model.fingerprint) {
    throw new PromptBankError(
      `${where}: made for backbone ${short(record.fingerprint)}; this model is ${short(model.fingerprint)}. ` +
        "Train or convert the task for this export",
    );
  }
  let file = `${name}.npy`;
  if (version >= 2) {
    file = record.vectors;
    if (typeof file !== "string" || !file.startsWith(`${name}.`) || !file.endsWith(".npy") || file.includes("/")) {
      throw new PromptBankError(`${where}: vectors ${JSON.stringify(file)}; expected ${name}.<hash>.npy in the bank`);
    }
  }
  const bytes = await reader.read(file);
  if (bytes === null) throw new PromptBankError(`${where}: its vectors ${file} are not in the bank (yet)`);
  if (version >= 2) {
    const digest = await sha256Hex(bytes);
    if (digest !== record.vectors_sha256) {
      throw new PromptBankError(`${file}: sha256 ${digest.slice(0, 16)}... is not the record's ${String(record.vectors_sha256).slice(0, 16)}...; the vectors were changed under their record`);
    }
  }
  const array = parseNpy(bytes, file);
  if (!["float32", "float16"].includes(array.dtype)) throw new PromptBankError(`${file}: ${array.dtype}; expected float32 or float16`);
  const values = toFloat32(array);
  if (!values.every(Number.isFinite)) throw new PromptBankError(`${file}: holds NaN or inf`);
  const spec = TaskSpec.fromExtra(record.extra ?? {}, `task ${JSON.stringify(name)}`);
  if (record.method === "prefix") return prefixTask(name, where, record, array, values, spec, model);
  const [rows, width] = array.shape;
  if (array.shape.length !== 2 || width !== model.hidden_size) {
    throw new PromptBankError(`${file}: shape [${array.shape}]; expected [P, ${model.hidden_size}] (this model's width)`);
  }
  if (record.length !== rows || record.width !== width) {
    throw new PromptBankError(`${where}: says ${record.length} x ${record.width}; its vectors are ${rows} x ${width}`);
  }
  if (spec.slots.length && spec.slots.reduce((a, b) => a + b, 0) !== rows) {
    throw new PromptBankError(`${where}: template ${JSON.stringify(spec.template)} has slots for ${spec.slots.reduce((a, b) => a + b, 0)} vectors; the task has ${rows}`);
  }
  const lead = spec.lead ?? rows;
  return {
    name, spec, rows: lead, past: null,
    vectors: values.subarray(0, lead * width),
    inner: values.subarray(lead * width), innerRows: rows - lead,
  };
}

function prefixTask(name, where, record, array, values, spec, model) {
  const [kv, heads, length, size] = array.shape;
  const want = [2 * model.num_layers, model.num_kv_heads, size, model.head_size];
  if (array.shape.length !== 4 || kv !== want[0] || heads !== want[1] || size !== model.head_size) {
    throw new PromptBankError(
      `${where}: a prefix of [${array.shape}]; this export's cache needs [${want[0]}, ${want[1]}, P, ${want[3]}]`,
    );
  }
  const each = heads * length * size;
  const past = Array.from({ length: kv }, (_, i) => values.subarray(i * each, (i + 1) * each));
  return { name, spec, rows: 0, vectors: new Float32Array(0), inner: new Float32Array(0), innerRows: 0, past, prefixLength: length };
}

/** Every named task, or an error naming the first that fails; `names` lists what the bank holds. */
export async function readBank(reader, names, model) {
  const tasks = new Map();
  for (const name of names) tasks.set(name, await readTask(reader, name, model));
  return tasks;
}
