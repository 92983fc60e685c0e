#!/usr/bin/env node
// Serve the page (web/page), the library, export folders and a bank from 127.0.0.1, with the COOP/COEP headers
// WebAssembly threads need:
//   node web/serve.js --export exports/smollm2-int4-web [--export exports/other ...] --bank banks/smollm2-135m [--port 8321]

import { createServer } from "node:http";
import { createReadStream, existsSync, statSync } from "node:fs";
import { readdir } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json", ".wasm": "application/wasm", ".css": "text/css" };

/** Serve the page, each export at /exports/NAME/ (the first also at /export/), the bank at /bank/ and any `more`
 * folders ({"/gguf/": dir}); /api/exports and /api/tasks list them for the page. */
export function startServer({ exportDir, exportDirs = [exportDir], bankDir, port = 8321, host = "127.0.0.1", more = {} }) {
  const exports = Object.fromEntries(exportDirs.map((dir) => [path.basename(path.resolve(dir)), path.resolve(dir)]));
  const named = Object.fromEntries(Object.entries(exports).map(([name, dir]) => [`/exports/${name}/`, dir]));
  const roots = { "/export/": path.resolve(exportDirs[0]), ...named, "/bank/": bankDir ? path.resolve(bankDir) : null, ...more, "/": HERE };
  const server = createServer(async (request, response) => {
    const url = new URL(request.url, `http://${host}`);
    response.setHeader("Cross-Origin-Opener-Policy", "same-origin");
    response.setHeader("Cross-Origin-Embedder-Policy", "require-corp");
    response.setHeader("Cache-Control", "no-cache");
    if (url.pathname === "/") {
      response.writeHead(302, { Location: "/page/index.html" }).end();
      return;
    }
    if (url.pathname === "/api/exports") {
      response.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify(Object.keys(exports)));
      return;
    }
    if (url.pathname === "/api/tasks") { // the page's list of the bank's tasks (FORMAT.md defines no index file)
      const names = roots["/bank/"] ? (await readdir(roots["/bank/"])).filter((n) => n.endsWith(".json") && !n.startsWith(".")).map((n) => n.slice(0, -5)).sort() : [];
      response.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify(names));
      return;
    }
    const prefix = Object.keys(roots).find((p) => p !== "/" && url.pathname.startsWith(p)) ?? "/";
    const root = roots[prefix];
    const file = root && path.resolve(root, decodeURIComponent(url.pathname.slice(prefix.length)));
    const allowed = file && (file === root || file.startsWith(root + path.sep)) && (prefix !== "/" || /^\/(page|src|node_modules|bench)\//.test(url.pathname));
    if (!allowed || !existsSync(file) || !statSync(file).isFile()) {
      response.writeHead(404, { "Content-Type": "text/plain" }).end(`${url.pathname}: not found`);
      return;
    }
    response.writeHead(200, { "Content-Type": TYPES[path.extname(file)] ?? "application/octet-stream", "Content-Length": statSync(file).size });
    createReadStream(file).pipe(response);
  });
  return new Promise((resolve) => server.listen(port, host, () => resolve(server)));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const options = { export: { type: "string", multiple: true }, bank: { type: "string" }, port: { type: "string", default: "8321" }, help: { type: "boolean" } };
  const { values } = parseArgs({ options });
  if (values.help || !values.export) {
    console.log("usage: node web/serve.js --export EXPORT_DIR [--export ...] [--bank BANK_DIR] [--port 8321]\nServes the softprompt page on 127.0.0.1 with the exports and the bank.");
    process.exit(values.help ? 0 : 2);
  }
  for (const dir of values.export) {
    if (!existsSync(path.join(dir, "softprompt.json"))) {
      console.error(`error: ${dir}: no softprompt.json; expected an export folder (export-model writes one)`);
      process.exit(1);
    }
  }
  const server = await startServer({ exportDirs: values.export, bankDir: values.bank, port: Number(values.port) });
  console.log(`serving ${values.export.join(", ")}${values.bank ? ` and ${values.bank}` : ""} on http://127.0.0.1:${server.address().port}/`);
}
