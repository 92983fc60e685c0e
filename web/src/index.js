// softprompt-web: load an export folder and a prompt bank, then generate, stream, classify and chat.
//
//   import * as ort from "onnxruntime-web";
//   import { load } from "softprompt-web";
//   const model = await load("exports/smollm2-int4/", { ort, bank: "banks/smollm2-135m/", tasks: ["define"] });
//   for await (const piece of model.stream("Committee, n.", { task: "define" })) output.append(piece);

import { Tokenizer } from "@huggingface/tokenizers";

import { readBank } from "./bank.js";
import { ExportFormatError, SoftpromptError } from "./errors.js";
import { readJson, readerOf } from "./files.js";
import { Model } from "./model.js";
import { openTable } from "./table.js";

export { ExportFormatError, PromptBankError, RequestError, SoftpromptError, UnknownTaskError } from "./errors.js";
export { NumpyRandom } from "./rng.js";
export { Model };

const FORMAT_VERSIONS = [1];
// export-model --kv-cache shared (the default for CPUs): GroupQueryAttention with query_seqlens, from onnxruntime 1.32.
const SHARED_CACHE_ORT = [1, 32];
const SPECIAL_TOKENS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/**
 * Open an export folder (a URL, or a reader with `read(name)`) and, optionally, tasks of a bank. Everything is
 * read and checked before anything is returned: a bad task, a bank for another model or an export this library
 * cannot run is one error, and nothing is half-loaded.
 *
 * Options: `ort` (onnxruntime-web or onnxruntime-node; default globalThis.ort), `bank` (URL or reader), `tasks`
 * (names to serve; default: the bank reader's `list()`), `sessionOptions` (onnxruntime's), `maxBytes` (refuse an
 * export whose files exceed it; default 2 GiB, what a page's WebAssembly memory can hold).
 */
export async function load(exportDir, options = {}) {
  const ort = options.ort ?? globalThis.ort;
  if (!ort?.InferenceSession) throw new SoftpromptError("no onnxruntime: pass { ort } (onnxruntime-web, or onnxruntime-node)");
  const reader = readerOf(exportDir);
  const config = await readJson(reader, "softprompt.json", ExportFormatError);
  if (config === null) throw new ExportFormatError(`${reader.where ?? exportDir}softprompt.json: missing; not an export folder`);
  if (!FORMAT_VERSIONS.includes(config.format_version)) {
    throw new ExportFormatError(`softprompt.json: format_version ${config.format_version}; this library reads ${FORMAT_VERSIONS}`);
  }
  if (config.kind !== "decoder") throw new ExportFormatError(`softprompt.json: a ${config.kind} export; this library runs decoders`);
  checkOnnxruntime(config, ort.env?.versions?.common ?? "0.0");
  const modelName = config.files.model;
  const graph = await reader.read(modelName);
  if (graph === null) throw new ExportFormatError(`${modelName}: missing from the export`);
  const dataName = `${modelName}.data`;
  const data = await reader.read(dataName);
  const size = graph.byteLength + (data?.byteLength ?? 0);
  const maxBytes = options.maxBytes ?? 2 ** 31;
  if (size > maxBytes) {
    throw new ExportFormatError(`the export's graph is ${(size / 2 ** 20).toFixed(0)} MiB; this page can hold ${(maxBytes / 2 ** 20).toFixed(0)} MiB: export a smaller precision (--precision int4)`);
  }
  const table = await openTable(reader, config, data ? { [dataName]: data } : {});
  const tokenizerJson = await readJson(reader, config.files.tokenizer, ExportFormatError);
  const tokenizerConfig = (await readJson(reader, "tokenizer_config.json", ExportFormatError)) ?? {};
  if (tokenizerJson === null) throw new ExportFormatError(`${config.files.tokenizer}: missing from the export`);
  const tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
  const templateBytes = await reader.read("chat_template.jinja");
  const chatTemplate = templateBytes ? new TextDecoder().decode(templateBytes) : tokenizerConfig.chat_template ?? null;
  const specialTokens = Object.fromEntries(
    SPECIAL_TOKENS.filter((k) => tokenizerConfig[k]).map((k) => [k, typeof tokenizerConfig[k] === "string" ? tokenizerConfig[k] : tokenizerConfig[k].content]),
  );
  let bankReader = null;
  let taskNames = [];
  let tasks = new Map();
  if (options.bank) {
    bankReader = readerOf(options.bank);
    taskNames = options.tasks ?? (bankReader.list ? await bankReader.list() : null);
    if (!taskNames) throw new SoftpromptError("name the bank's tasks to serve: load(export, { bank, tasks: [...] })");
    tasks = await readBank(bankReader, taskNames, config);
  }
  const sessionOptions = { ...(options.sessionOptions ?? {}) };
  if (config.quantization?.web) {
    // export-model --web: fold DequantizeLinear + MatMul into float weights once (WebAssembly's 4- and 8-bit
    // kernels are an order of magnitude slower than its float ones).
    const extra = sessionOptions.extra ?? {};
    sessionOptions.extra = { ...extra, session: { ...(extra.session ?? {}), disable_quant_qdq: "1" } };
  }
  if (data) sessionOptions.externalData = [{ path: dataName, data: new Uint8Array(data) }];
  let session;
  try {
    session = await ort.InferenceSession.create(new Uint8Array(graph), sessionOptions);
  } catch (error) {
    throw new ExportFormatError(`${modelName}: onnxruntime cannot open it (${error.message})`);
  }
  return new Model({ ort, session, config, tokenizer, table, bankReader, taskNames, tasks, chatTemplate, specialTokens });
}

/**
 * A shared-cache export names an input of GroupQueryAttention that onnxruntime before 1.32 lacks (onnxruntime-web's
 * latest is 1.31.1), which would refuse the graph with a schema error that does not say what to do: say it first.
 */
export function checkOnnxruntime(config, version) {
  const [major, minor] = String(version).split(".").map((part) => Number.parseInt(part, 10) || 0);
  const [needMajor, needMinor] = SHARED_CACHE_ORT;
  if (config.kv_cache === "shared" && (major < needMajor || (major === needMajor && minor < needMinor))) {
    throw new ExportFormatError(
      `this export's attention (export-model --kv-cache shared, the default for CPUs) needs onnxruntime ${SHARED_CACHE_ORT.join(".")} ` +
        `or later; this is onnxruntime ${version}: export the model for pages with --web, or with --kv-cache growing`,
    );
  }
}

/** A reader over a folder on disk (node): `read(name)` and `list()` (the bank's task names). */
export async function folderReader(folder) {
  const fs = await import("node:fs/promises");
  const path = await import("node:path");
  return {
    where: folder.endsWith("/") ? folder : `${folder}/`,
    async read(name) {
      try {
        const bytes = await fs.readFile(path.join(folder, name));
        return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
      } catch (error) {
        if (error.code === "ENOENT") return null;
        throw error;
      }
    },
    async list() {
      return (await fs.readdir(folder)).filter((n) => n.endsWith(".json") && !n.startsWith(".")).map((n) => n.slice(0, -5)).sort();
    },
  };
}
